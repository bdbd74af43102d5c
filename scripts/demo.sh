#!/usr/bin/env bash
# The built-in example, end to end: generate a synthetic BIDS dataset with fMRIPrep-style
# derivatives, then run every level and mode on it. Usage: scripts/demo.sh [DEMO_DIR]
set -euo pipefail
demo=${1:-demo}
mkdir -p "$demo"
demo=$(cd "$demo" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)

# Caches: the user's own TemplateFlow/nilearn caches when set; otherwise private ones in
# the demo folder, seeded from (1) the real files in ../shared/data when this checkout has
# them, (2) the network through bids_roimae-fetch, (3) synthetic stand-ins on the real
# MNI152NLin2009cAsym 2 mm grid (offline machines).
export TEMPLATEFLOW_HOME=${TEMPLATEFLOW_HOME:-$demo/templateflow}
export NILEARN_DATA=${NILEARN_DATA:-$demo/nilearn_data}
export TEMPLATEFLOW_AUTOUPDATE=0
export MPLBACKEND=Agg
tpl=$TEMPLATEFLOW_HOME/tpl-MNI152NLin2009cAsym
shared=$here/../shared/data
if [ ! -s "$tpl/tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz" ]; then
  if [ -d "$shared/tpl-MNI152NLin2009cAsym" ]; then
    echo "demo: using the template and AAL3 files in $shared"
    mkdir -p "$tpl" "$NILEARN_DATA/aal_3v2/AAL3"
    cp "$shared"/tpl-MNI152NLin2009cAsym/*.nii.gz "$tpl/"
    gunzip -c "$shared/aal3/AAL3v1.nii.gz" > "$NILEARN_DATA/aal_3v2/AAL3/AAL3v1.nii"
    cp "$shared/aal3/AAL3v1.xml" "$NILEARN_DATA/aal_3v2/AAL3/"
  elif bids_roimae-fetch >/dev/null 2>&1; then
    echo "demo: fetched the template and AAL3 into $TEMPLATEFLOW_HOME and $NILEARN_DATA"
  else
    echo "demo: offline; writing a synthetic template and atlas on the real 2 mm grid"
    python -c "from bids_roimae.synth.resources import write_synthetic_resources as w; \
w('$TEMPLATEFLOW_HOME', '$NILEARN_DATA', shape=(97, 115, 97))"
  fi
fi

data=$demo/data
out=$demo/out
[ -f "$data/participants.tsv" ] || bids_roimae-synth "$data" --n-subjects 12 --n-frames 60

common=(--model-preset tiny -w "$demo/work" --nprocs 2)
set -x
bids_roimae "$data" "$out" participant --mode prepare "${common[@]}"
bids_roimae "$data" "$out" group --mode pretrain --masking roi --steps 20 --batch-size 2 "${common[@]}"
bids_roimae "$data" "$out" group --mode pretrain --masking random --steps 20 --batch-size 2 "${common[@]}"
bids_roimae "$data" "$out" participant --mode finetune --target dx --positive 1 2 3 \
  --folds 3 --compare-masking "${common[@]}"
bids_roimae "$data" "$out" participant --mode finetune --target dx --positive 1 2 3 \
  --folds 3 --pretrained "$out/models/roimae_mask-roi_preset-tiny_ps-6/model.pt" "${common[@]}"
# Integrated Gradients for everyone (the group tables compare ADHD with controls); region
# fidelity (one forward pass per window and region, slow on a CPU) for sub-01 only.
bids_roimae "$data" "$out" participant --mode predict --no-fidelity "${common[@]}"
bids_roimae "$data" "$out" participant --mode predict --participant_label 01 \
  --fidelity-windows 2 "${common[@]}"
bids_roimae "$data" "$out" group --mode report "${common[@]}"
set +x
python - "$out" "$data" <<'PY'
import json, sys
import pandas as pd
out, data = sys.argv[1:]
planted = [p["name"] for p in json.load(open(f"{data}/code/synth_manifest.json"))["planted_regions"]]
path = f"{out}/group/seg-AAL3_stat-ig_desc-groupdiff_stats.tsv"
table = pd.read_csv(path, sep="\t")
print(f"demo: planted regions {', '.join(planted)}; top of {path.split('/')[-1]}:")
print(table.head(5)[["rank", "name", "system", "statistic", "cohen_d", "p"]].to_string(index=False))
PY
echo "demo: outputs in $out (open $out/group/group_report.html and $out/sub-01.html)"
