#!/bin/bash
# One step of the off-axis fine-tune and its candidate bundle (docs/RESULTS.md, sessions 9–10): train,
# release, int8 bundle, the fusion caches' logits with the new weights, the tilt fusion refitted on the
# three caches, every figure the model card and RESULTS carry, the off-axis rule, the open set, the index.
#
#   bash benchmarks/offaxis_finetune_chain.sh                      # session 9's second step (the defaults)
#   STEP=3 CONFIG=configs/cpu_finetune_offaxis3.toml RUN=runs/msdn_offaxis3_ft R=runs/s11 FT=runs/ft3 \
#       PREV=runs/ft2 EVIDENCE=runs/turn bash benchmarks/offaxis_finetune_chain.sh
#
# Needs data/mp and the datasets the config names, the run its init_from names, and the fusion caches
# data/fusion{,_mis05,_mis2,_openset} (docs/BUNDLE.md). EVIDENCE: the folder whose <cache>/evidence holds
# each cache's evidence from the current code (`python -m xtalsym.offline.fusion_data --out <folder>/<cache>
# --evidence`, with the cache's chunks linked there; data/ when that is where it was computed).
# SKIP_TRAIN=1 starts from an existing $RUN/best.pt.
set -ex
cd "$(dirname "$0")/.."
X=.venv/bin/xtalsym
PY=.venv/bin/python
STEP=${STEP:-2}
CONFIG=${CONFIG:-configs/cpu_finetune_offaxis2.toml}
RUN=${RUN:-runs/msdn_offaxis2_ft}
R=${R:-runs/s10}
FT=${FT:-runs/ft2}
PREV=${PREV:-runs/ft}
EVIDENCE=${EVIDENCE:-data}
date
[ -n "$SKIP_TRAIN" ] || $X train --config $CONFIG --out $RUN
date
$X evaluate --checkpoint $RUN/best.pt --dataset data/mp --split test --out $R/eval_test --no-progress
$X model release --checkpoint $RUN/best.pt --evaluation $R/eval_test --out $R/release --name msdn_paper72_cpu112_offaxis${STEP}_ft
$X bundle build --release $R/release --out $R/bundle --int8-calibration data/mp --int8-samples 128 --int8-test data/mp
for c in fusion fusion_mis05 fusion_mis2 fusion_openset; do
  $PY -m xtalsym.offline.fusion_data --from-cache data/$c --out $FT/$c --bundle $R/bundle --precision fp32 --workers 2
  ln -sfn "$(readlink -f $EVIDENCE/$c/evidence)" $FT/$c/evidence
done
$PY benchmarks/msdn_on_caches.py --split val $PREV/fusion $PREV/fusion_mis05 $PREV/fusion_mis2 $FT/fusion $FT/fusion_mis05 $FT/fusion_mis2 | tee $R/msdn_val.md
date
$PY benchmarks/fusion.py --features $FT/fusion --evidence $FT/fusion/evidence --bundle $R/bundle --prior-from reference_index/fusion.json --fit-also $FT/fusion_mis05 --fit-also $FT/fusion_mis2 --out $R/fit --write-params $R/fit/fusion.json > $R/fit.log 2>&1
P=$R/fit/fusion.json
for c in fusion fusion_mis05 fusion_mis2; do
  $PY benchmarks/fusion.py --features $FT/$c --evidence $FT/$c/evidence --bundle $R/bundle --params $P --out $R/rec_$c --record $P > $R/rec_$c.log 2>&1
done
$PY benchmarks/fusion_off_axis.py --exact $FT/fusion --tilted $FT/fusion_mis05 --tilted $FT/fusion_mis2 --params $P --split val --record $P > $R/offaxis_val.log 2>&1
$PY benchmarks/fusion_off_axis.py --exact $FT/fusion --tilted $FT/fusion_mis05 --tilted $FT/fusion_mis2 --params $P --split test > $R/offaxis_test.log 2>&1
$PY benchmarks/fusion_open_set.py --open-set $FT/fusion_openset --known $FT/fusion --bundle $R/bundle --params $P --record $P > $R/openset.log 2>&1
$X index evaluate --bundle $R/bundle --dataset data/mp --out $R/open_set --real-only --max-false-unknown 0.2 --threads 2 --no-progress > $R/index_eval.log 2>&1
$X index build --bundle $R/bundle --dataset data/mp --out $R/index --kind pq --calibration $R/open_set/metrics.json --threads 2 > $R/index_build.log 2>&1
$X bundle add-index $R/bundle $R/index
$X bundle add-fusion $R/bundle $P
$X bundle verify $R/bundle
date
echo CHAIN DONE
