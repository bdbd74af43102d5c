#!/usr/bin/env bash
# The built-in example, end to end: generate a synthetic BIDS dataset with fMRIPrep-style
# derivatives, then run every level and mode on it. Usage: scripts/demo.sh [DEMO_DIR]
set -euo pipefail
demo=${1:-demo}
mkdir -p "$demo"
demo=$(cd "$demo" && pwd)
started=$SECONDS  # the demo's own time: everything after the virtual environment exists

# Caches: the user's own TemplateFlow/nilearn caches when set; otherwise private ones in
# the demo folder, filled (1) from the network through bids_roimae-fetch, else (2) with
# synthetic stand-ins on the real MNI152NLin2009cAsym 2 mm grid (offline machines).
export TEMPLATEFLOW_HOME=${TEMPLATEFLOW_HOME:-$demo/templateflow}
export NILEARN_DATA=${NILEARN_DATA:-$demo/nilearn_data}
export TEMPLATEFLOW_AUTOUPDATE=0
export MPLBACKEND=Agg
if ! bids_roimae-fetch >/dev/null 2>&1; then
  echo "demo: offline; writing a synthetic template and atlas on the real 2 mm grid"
  export TEMPLATEFLOW_HOME=$demo/templateflow NILEARN_DATA=$demo/nilearn_data
  python -c "from bids_roimae.synth.resources import write_synthetic_resources as w; \
w('$TEMPLATEFLOW_HOME', '$NILEARN_DATA', shape=(97, 115, 97))"
fi
echo "demo: template from $TEMPLATEFLOW_HOME, atlas from $NILEARN_DATA"

data=$demo/data
out=$demo/out
# The demo's choices, for minutes on a 2-core CPU (every one a documented setting; the
# defaults are for real studies): 12 subjects (6 per group) of 48 frames; 8 mm patches and
# 16-frame windows of two 8-frame time tokens (1.8 k brain tokens per window instead of
# 17 k); 12 pretraining steps with a short warm-up, validated on 4 windows; a subject's
# 2 windows (not 8 overlapping ones) for fine-tuning, prediction and embeddings; 2 x 3-fold
# cross-validation (default 5 x 5); Integrated Gradients on one window per run with 4
# integration points (the sidecars report the completeness error); region fidelity on
# one window of one subject.
cat > "$demo/demo.toml" <<'TOML'
[geometry]
patch_size = 8
window = 16
temporal_patch = 8
[train]
warmup_steps = 4
val_batches = 1
[finetune]
windows_per_run = 2
[attribution]
windows = 1
min_steps = 4
steps = 4
TOML
common=(--model-preset tiny -w "$demo/work" --nprocs 2 --config "$demo/demo.toml")

children_cpu() {  # $cpu: CPU seconds used so far by this script's finished children
  times > "$demo/.times"  # in this shell (not a $(...) subshell), so it sees them
  cpu=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); n += 60 * t[1] + t[2] }
        printf "%d", n }' "$demo/.times")
}
step() {  # step LABEL COMMAND...: run it, print it, its elapsed time and CPU time
  local label=$1 t0=$SECONDS c0
  children_cpu
  c0=$cpu
  shift
  echo "+ $*"
  "$@"
  children_cpu
  printf 'demo: %-36s %4d s  (%d CPU-s)\n' "$label" $(( SECONDS - t0 )) $(( cpu - c0 ))
}
# The planted effect: 8 limbic and cerebellar regions (of the 29 the offline stand-in atlas
# has; the full AAL3 gets 10 by default) fluctuate 2.6 x more and couple less to their
# network in ADHD. Two regions, the default on small atlases, are too few for 12 subjects:
# the baseline and the probe then sit at chance, each with hundreds of features.
planted=()
for region in Hippocampus_L Hippocampus_R Amygdala_L Amygdala_R Cerebellum_Crus1_L \
    Cerebellum_Crus1_R Cerebellum_6_L Cerebellum_6_R; do planted+=(--planted "$region"); done
[ -f "$data/participants.tsv" ] || \
  step "synthetic dataset" bids_roimae-synth "$data" --n-subjects 12 --n-frames 48 \
    --effect-size 0.8 "${planted[@]}"
step "participant prepare" bids_roimae "$data" "$out" participant --mode prepare "${common[@]}"
step "group pretrain (roi)" bids_roimae "$data" "$out" group --mode pretrain --masking roi \
  --steps 12 --batch-size 4 "${common[@]}"
step "group pretrain (random)" bids_roimae "$data" "$out" group --mode pretrain \
  --masking random --steps 12 --batch-size 4 "${common[@]}"
step "participant finetune (compare)" bids_roimae "$data" "$out" participant --mode finetune \
  --target dx --positive 1 2 3 --folds 3 --cv-repeats 2 --compare-masking "${common[@]}"
step "participant finetune (roi)" bids_roimae "$data" "$out" participant --mode finetune \
  --target dx --positive 1 2 3 --folds 3 --cv-repeats 2 \
  --pretrained "$out/models/roimae_mask-roi_preset-tiny_ps-8/model.pt" "${common[@]}"
# Integrated Gradients for everyone (the group tables compare ADHD with controls); region
# fidelity for sub-01 only.
step "participant predict (IG, all)" bids_roimae "$data" "$out" participant --mode predict \
  --no-fidelity "${common[@]}"
step "participant predict (fidelity, 01)" bids_roimae "$data" "$out" participant \
  --mode predict --participant_label 01 --fidelity-windows 1 "${common[@]}"
step "participant embed" bids_roimae "$data" "$out" participant --mode embed \
  --pretrained "$out/models/roimae_mask-roi_preset-tiny_ps-8/model.pt" "${common[@]}"
step "group report" bids_roimae "$data" "$out" group --mode report "${common[@]}"
python - "$out" "$data" <<'PY'
import json, sys
import pandas as pd
out, data = sys.argv[1:]
planted = [p["name"] for p in json.load(open(f"{data}/code/synth_manifest.json"))["planted_regions"]]
print(f"demo: planted regions {', '.join(planted)} (* below)")
for desc, what in [("relativeregions", "where the model relies on a region more than a "
                    "randomised head does on the same input (amplitude cancels)"),
                   ("groupdiff", "ADHD - control difference of mean |IG| (follows amplitude: "
                    "compare desc-randomgroupdiff)")]:
    table = pd.read_csv(f"{out}/group/seg-AAL3_stat-ig_desc-{desc}_stats.tsv", sep="\t")
    top = table.head(len(planted))
    marked = ", ".join(f"{n}{'*' if n in planted else ''}" for n in top["name"])
    print(f"demo: desc-{desc}, {what}; top {len(top)}: {marked} "
          f"({top['name'].isin(planted).sum()} of {len(planted)} planted)")
PY
echo "demo: outputs in $out (open $out/group/group_report.html and $out/sub-01.html)"
elapsed=$(( SECONDS - started ))
children_cpu
echo "demo: finished in $(( elapsed / 60 )) min $(( elapsed % 60 )) s, $cpu CPU-s \
(every level and mode, from generating the dataset to the group report)"
