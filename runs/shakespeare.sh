#!/usr/bin/env bash
# The recipe of dgemma's embedded default model (dgemma/assets/shakespeare/): a 2.5M-parameter DiffusionGemma
# (MoE, 64-token canvas) trained from scratch on Tiny Shakespeare with `dgemma train`, on one CPU thread, plus the
# autoregressive baseline of the same size and budget, the held-out evaluation and the export.
# See docs/shakespeare_model.md for the numbers this produced.
#
#     bash runs/shakespeare.sh            # from the repository root; about 45 minutes on one CPU thread
#
# Every step is seeded: rerunning gives the same tokenizer, the same examples and the same noise draws (weights
# agree up to float summation order on other hardware). Run folders go under runs/shakespeare/ (git-ignored);
# a killed training resumes from its last checkpoint when the same command is run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
DGEMMA=${DGEMMA:-dgemma}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # the published run used one CPU thread
OUT=runs/shakespeare

# 1. Held-out split (last ~10% of the lines) and a 2048-token byte-level BPE trained on the train part only.
$PY -m scripts.train_shakespeare_tokenizer --corpus data/tinyshakespeare.txt --out $OUT \
    --vocab-size 2048 --heldout-fraction 0.1

# 2. Training data: random 136-token windows of train.txt, each "<bos> + 8-token prompt + 128-token response"
#    (two 64-token canvases, exactly filled, so no EOS padding: --no-eos-canvas; the text has no document ends).
COMMON=(--config runs/shakespeare_config.json --data text:$OUT/train.txt --tokenizer $OUT/tokenizer
        --steps 600 --batch-size 16 --lr 2e-3 --min-lr-ratio 0.1 --warmup 40 --save-every 100 --seed 0
        --data-arg window=136 --data-arg min_prompt=8 --data-arg min_response=128 --data-arg bos_id=2
        --no-eos-canvas --no-progress)

# 3. The diffusion model: the full objective (denoising loss + encoder next-token loss, self-conditioning 0.5).
$DGEMMA train "${COMMON[@]}" --out $OUT/diffusion

# 4. The autoregressive baseline: same architecture, init, data, steps and schedule; encoder next-token loss only
#    (decoder loss weight 0), through the same Trainer.
$PY -m scripts.eval_text_model train-ar "${COMMON[@]}" --out $OUT/ar

# 5. The shipped model only: 300 more steps of the same objective on fresh examples (--seed 1), from the diffusion
#    checkpoint, on a new warm-up + cosine (1e-3 -> 1e-4). The AR comparison (step 6) is at the equal 600 steps.
$DGEMMA train --init-from $OUT/diffusion/final --data text:$OUT/train.txt --tokenizer $OUT/tokenizer \
    --out $OUT/diffusion_cont --steps 300 --batch-size 16 --lr 1e-3 --min-lr-ratio 0.1 --warmup 20 \
    --save-every 100 --seed 1 --data-arg window=136 --data-arg min_prompt=8 --data-arg min_response=128 \
    --data-arg bos_id=2 --no-eos-canvas --no-progress

# 6. Held-out losses (JSON), kept next to the runs.
$PY -m scripts.eval_text_model eval $OUT/diffusion/final $OUT/ar/final $OUT/diffusion_cont/final \
    --heldout $OUT/heldout.txt --tokenizer $OUT/tokenizer --examples 256 | tee $OUT/eval.json

# 7. Export: the shipped model (fp32 weights), the tokenizer files and the tuned generation defaults.
$PY -m scripts.eval_text_model export $OUT/diffusion_cont/final --tokenizer $OUT/tokenizer \
    --out dgemma/assets/shakespeare --dtype float32

# 8. Generation statistics at the shipped defaults (samples scored by the AR baseline), and the CLI with no --model.
$PY -m scripts.eval_text_model sample dgemma/assets/shakespeare --seeds 3 --score-with $OUT/ar/final \
    | tee $OUT/sample.txt
$DGEMMA generate "ROMEO:" --seed 0 --json
