#!/usr/bin/env bash
# The recipe of the shipped Sudoku solver (dgemma/assets/sudoku/) and its autoregressive baseline
# (dgemma/assets/sudoku_ar/): a 1.63M-parameter DiffusionGemma (MoE, one 81-token canvas) trained from scratch on
# generated puzzles with `dgemma sudoku train`; then the evaluations and the plot of docs/sudoku.md.
#
#     bash runs/sudoku.sh            # from the repository root, on a 2-core CPU: ~3 h of training + ~1 h of eval
#
# The two trainings run side by side, one CPU thread each (the published run did exactly that on a 2-core machine).
# Training data are generated (dgemma.sudoku.recipe.SudokuSource), never read from the evaluation files. Every step
# is seeded: a rerun gives the same examples, noise draws and initial weights (weights agree up to float summation
# order on other hardware). Run folders go under runs/sudoku/ (git-ignored); a killed training resumes from its
# last checkpoint when the same command is run again. On a GPU add `--device cuda` (bf16 autocast).
set -euo pipefail
cd "$(dirname "$0")/.."

DGEMMA=${DGEMMA:-dgemma}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=runs/sudoku
DATA=${DATA:-../shared/data/sudoku}
# Three stages over one seeded data stream, 203,200 examples in all: steps 1-450 at batch 128 under a 900-step
# cosine, then steps 451-2150 at batch 32 with the cosine re-aimed at 2,150 steps (lr 1e-3, 50 warm-up steps, cosine
# to 1e-4; progress per *step* proved nearly independent of the batch, so the run switched to more, smaller steps),
# then a warm restart, steps 2151-5000: lr 5e-4 under a cosine re-aimed at 5,000 steps (3.3e-4 at step 2151, down to
# 5e-5), with training givens widened to 20-42. See docs/sudoku.md.
COMMON=(--warmup 50 --seed 0 --threads 1 --no-progress)
STAGE1=(--steps 900 --batch-size 128 --stop-at 450 --save-every 50 --lr 1e-3 --givens 22:45)
STAGE2=(--steps 2150 --batch-size 32 --save-every 100 --lr 1e-3 --givens 22:45)
STAGE3=(--steps 5000 --batch-size 32 --save-every 100 --lr 5e-4 --givens 20:42)
mkdir -p $OUT

# 1. The diffusion solver (decoder loss, self-conditioning 0.5) and 2. the AR baseline (same architecture, init,
#    data, batch and schedule; the encoder's next-token loss on the solution): the same budget, side by side.
train() {  # train OUT [--ar]
    local out=$1; shift
    $DGEMMA sudoku train --out "$out" "${STAGE1[@]}" "${COMMON[@]}" "$@"
    $DGEMMA sudoku train --out "$out" "${STAGE2[@]}" "${COMMON[@]}" "$@"
    $DGEMMA sudoku train --out "$out" "${STAGE3[@]}" "${COMMON[@]}" "$@"
}
train $OUT/diffusion > $OUT/diffusion.log 2>&1 &
diffusion=$!
train $OUT/ar --ar > $OUT/ar.log 2>&1 &
ar=$!
wait $diffusion
wait $ar

# 3. Ship them (HF layout, float32).
rm -rf dgemma/assets/sudoku dgemma/assets/sudoku_ar
cp -r $OUT/diffusion/final dgemma/assets/sudoku
cp -r $OUT/ar/final dgemma/assets/sudoku_ar

# 4. Evaluations (docs/sudoku.md): SATNet test split (last 1,000 rows); RRN hard set (the first 100 rows of each
#    number of givens; the file holds 1,000 of each, shuffled) alone and with up to 16 and 32 verified attempts; the
#    diffusion-vs-AR sweep with its plot; diffusion vs AR on the hard set (20 rows per givens), 1 and 16 attempts.
$DGEMMA sudoku eval $DATA/satnet_10k.csv --rows -1000: --json $OUT/eval_satnet.json --no-progress
RRN_ROWS=$OUT/rrn_100_per_givens.csv
awk -F, '{ p = $1; n = gsub(/[1-9]/, "", p); if (count[n]++ < 100) print }' $DATA/rrn_test_18k.csv > $RRN_ROWS
$DGEMMA sudoku eval $RRN_ROWS --json $OUT/eval_rrn.json --no-progress
for k in 16 32; do
    $DGEMMA sudoku eval $RRN_ROWS --attempts $k --json $OUT/eval_rrn_x$k.json --no-progress
done
$DGEMMA sudoku bench $DATA/satnet_10k.csv --rows -1000: --max-denoising-steps 1,2,4,8,12,24,48 \
    --json $OUT/bench_satnet.json --plot docs/sudoku_accuracy_vs_steps.png --no-progress
RRN_SMALL=$OUT/rrn_20_per_givens.csv
awk -F, '{ p = $1; n = gsub(/[1-9]/, "", p); if (count[n]++ < 20) print }' $DATA/rrn_test_18k.csv > $RRN_SMALL
for k in 1 16; do
    $DGEMMA sudoku bench $RRN_SMALL --attempts $k --json $OUT/bench_rrn_x$k.json --no-progress
done

# 5. The sampler check of docs/sudoku.md on fresh generated puzzles (validation data, not an evaluation file).
$DGEMMA sudoku generate --out $OUT/val_30_42.csv --n 200 --givens 30:42 --seed 1
for flags in "" "--entropy-bound 0.3" "--entropy-bound 1.0" "--t-max 0.5 --t-min 0.2" \
             "--entropy-bound 0.3 --t-max 0.5 --t-min 0.2"; do
    # shellcheck disable=SC2086
    $DGEMMA sudoku eval $OUT/val_30_42.csv --rows :100 --no-progress $flags
done
