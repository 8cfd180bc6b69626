#!/bin/bash
# Session 9, second step (docs/RESULTS.md): fine-tune on exact + 2°, then the candidate bundle in runs/s10
# with a refitted tilt fusion, every figure the model card and RESULTS carry. Needs data/mp, data/mp_mis2,
# runs/msdn_offaxis_ft/best.pt and the fusion caches data/fusion{,_mis05,_mis2,_openset} (docs/BUNDLE.md).
set -ex
cd "$(dirname "$0")/.."
X=.venv/bin/xtalsym
PY=.venv/bin/python
R=runs/s10
date
$X train --config configs/cpu_finetune_offaxis2.toml --out runs/msdn_offaxis2_ft
date
$X evaluate --checkpoint runs/msdn_offaxis2_ft/best.pt --dataset data/mp --split test --out $R/eval_test --no-progress
$X model release --checkpoint runs/msdn_offaxis2_ft/best.pt --evaluation $R/eval_test --out $R/release --name msdn_paper72_cpu112_offaxis2_ft
$X bundle build --release $R/release --out $R/bundle --int8-calibration data/mp --int8-samples 128 --int8-test data/mp
for c in fusion fusion_mis05 fusion_mis2 fusion_openset; do
  $PY -m xtalsym.offline.fusion_data --from-cache data/$c --out runs/ft2/$c --bundle $R/bundle --precision fp32 --workers 2
  ln -sfn "$PWD/data/$c/evidence" runs/ft2/$c/evidence
done
$PY benchmarks/msdn_on_caches.py --split val runs/ft/fusion runs/ft/fusion_mis05 runs/ft/fusion_mis2 runs/ft2/fusion runs/ft2/fusion_mis05 runs/ft2/fusion_mis2 | tee $R/msdn_val.md
date
$PY benchmarks/fusion.py --features runs/ft2/fusion --evidence data/fusion/evidence --bundle $R/bundle --prior-from reference_index/fusion.json --fit-also runs/ft2/fusion_mis05 --fit-also runs/ft2/fusion_mis2 --out $R/fit --write-params $R/fit/fusion.json > $R/fit.log 2>&1
P=$R/fit/fusion.json
for c in fusion fusion_mis05 fusion_mis2; do
  $PY benchmarks/fusion.py --features runs/ft2/$c --evidence data/$c/evidence --bundle $R/bundle --params $P --out $R/rec_$c --record $P > $R/rec_$c.log 2>&1
done
$PY benchmarks/fusion_off_axis.py --exact runs/ft2/fusion --tilted runs/ft2/fusion_mis05 --tilted runs/ft2/fusion_mis2 --params $P --split val --record $P > $R/offaxis_val.log 2>&1
$PY benchmarks/fusion_off_axis.py --exact runs/ft2/fusion --tilted runs/ft2/fusion_mis05 --tilted runs/ft2/fusion_mis2 --params $P --split test > $R/offaxis_test.log 2>&1
$PY benchmarks/fusion_open_set.py --open-set runs/ft2/fusion_openset --known runs/ft2/fusion --bundle $R/bundle --params $P --record $P > $R/openset.log 2>&1
$X index evaluate --bundle $R/bundle --dataset data/mp --out $R/open_set --real-only --max-false-unknown 0.2 --threads 2 --no-progress > $R/index_eval.log 2>&1
$X index build --bundle $R/bundle --dataset data/mp --out $R/index --kind pq --calibration $R/open_set/metrics.json --threads 2 > $R/index_build.log 2>&1
$X bundle add-index $R/bundle $R/index
$X bundle add-fusion $R/bundle $P
$X bundle verify $R/bundle
date
echo CHAIN DONE
