#!/usr/bin/env bash
# Run the GPU benchmarks in order, in the background, so that a dropped connection does not stop them.
#
#   bash benchmarks/chain.sh start [SECONDS]   # start the chain detached; print its log after SECONDS (default 5)
#   bash benchmarks/chain.sh wait SECONDS      # wait until it is done or SECONDS have passed; print its log
#
# Each step's output goes to $RES/STEP.log (and the benchmark's report under $RES/STEP/), the chain's progress to
# $RES/chain.log. When $OUT is set, `start` and `wait` also copy every small text result into $OUT/res.tgz.
# Settings (environment):
#   STEPS      steps, in order (default: gsplat gen real encoder adapt speed; also semantic, ffinit, mixedsemantic,
#              capacity, query, profile, memory, ddp, gputests)
#   RES        results folder (default /tmp/res)
#   SETUP      a script to source first (e.g. one that installs wheels and sets SPLATSEM_DATA)
#   GSPLAT_PREBUILT  a gsplat_cuda.so(.gz) saved by an earlier `gsplat` step: loaded instead of compiling
#   NSCENES (300), GEN_ARGS (more splatsem-synthetic options, e.g. --labeled-points-seen-only), ENC_STEPS (856), ENC_MIN (8), ENC_DECAY (750), ENC_ARGS,
#   AD_ITERS (5000), AD_EVAL ("0 500 2000"), AD_SCOPE ("latents head"), SS_CENTRED ("0 1"), SS_MIN (5), SS_DECAY (1500),
#   SS_STEPS (100000): a step cap besides SS_MIN, so that semantic-splat runs compared across chains train equally long,
#   SS_MIXED (0.1) and SS_MIXED_CENTRED (1): the real share and centred weight of the `mixedsemantic` step,
#   FF_ITERS (3000), FF_EVAL ("0 500 1500"): the `ffinit` step's chorus-splat runs,
#   SPEED_ITERS (2000), SPEED_REPEATS (3), SPEED_METHODS ("splatfacto chorus-splat"), SPEED_INTERLEAVE (0: off; K: one
#   more round with the methods' trainers taking turns of K steps), MEM_START (1500),
#   DDP_ARGS (semantic-splat on the `gen` step's collection on 1, 2 and 4 GPUs, global batch 8, 1000 steps, one
#   seed-noise run, rank 0 profiled from step 600),
#   CAP_TRAIN (275), CAP_STEPS (3000), CAP_ARGS: the `capacity` step (encoder_capacity.py)
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(dirname "$HERE"); RES=${RES:-/tmp/res}

pack() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  (cd "$RES" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.txt' \
    -o -name '*.yml' -o -name '*.csv' \) -size -5M -print0 | tar czf "$OUT/res.tgz" --null -T - 2>/dev/null)
  if [ -f "$RES/gsplat_cuda.so.gz" ] && [ -z "${GSPLAT_PREBUILT:-}" ]; then cp "$RES/gsplat_cuda.so.gz" "$OUT/"; fi
}
# The ScanNet captures the `real` step indexes (NAME:FOLDER under $SPLATSEM_DATA), each into /tmp/NAME, where carried:
# the 50-frame one, and its 150-frame version, whose neighbouring frames overlap enough for two context views to see
# most of a target (the 50-frame one: 40% at best)
SCANNET="real:scannet_scene0000_00 realdense:scannet_scene0000_00_dense"
real_collections() {  # --real-collection for each ScanNet collection the `real` step built
  for pair in $SCANNET; do
    c=/tmp/${pair%%:*}/collection.json; [ -f "$c" ] && printf -- '--real-collection %s ' "$c"
  done
}
semantic_settings() {  # semantic_run: what every semantic-splat run of the chain shares (budget, loader, one
  # teacher-feature cache, the ScanNet collections built so far to score on)
  # shellcheck disable=SC2207
  semantic_run=($(real_collections) --minutes "${SS_MIN:-5}" --steps "${SS_STEPS:-100000}" --decay-steps "${SS_DECAY:-1500}" --loader-workers 12
    --extraction-workers 8 --feature-cache "$RES/ss_features")
}
log() { echo "[$(date +%H:%M:%S)] $*" >> "$RES/chain.log"; }
step() {
  local name=$1 began=$SECONDS rc; shift
  log "start $name"; "$@" > "$RES/$name.log" 2>&1; rc=$?; log "end $name rc=$rc $((SECONDS - began))s"
}

case ${1:-} in
start)
  mkdir -p "$RES"; (setsid nohup bash "$0" run > "$RES/chain.out" 2>&1 &)
  sleep "${2:-5}"; tail -20 "$RES/chain.log"; pack ;;
wait)
  # Packs every minute as well, so that a call cut short (the device's time running out) still brings results back.
  end=$((SECONDS + ${2:?seconds})); packed=$SECONDS
  while [ $SECONDS -lt $end ] && [ ! -f "$RES/DONE" ]; do
    sleep 5; if [ $((SECONDS - packed)) -ge 60 ]; then pack; packed=$SECONDS; fi
  done
  tail -40 "$RES/chain.log"; pack ;;
run)
  cd "$ROOT" || exit 1; mkdir -p "$RES"; rm -f "$RES/DONE"
  # shellcheck disable=SC1090
  [ -n "${SETUP:-}" ] && source "$SETUP" >> "$RES/chain.log" 2>&1
  export PYTHONPATH=$HERE/prebuilt_gsplat${PYTHONPATH:+:$PYTHONPATH}
  log "steps: ${STEPS:=gsplat gen real encoder adapt speed}"
  for s in $STEPS; do
    case $s in
    gsplat)  # compile (or load) gsplat's extension once, and keep the build for the next machine
      step gsplat python -c "from gsplat.cuda._backend import _C; assert _C is not None, 'no gsplat extension'; print(_C)"
      built=$(find ~/.cache/torch_extensions -name gsplat_cuda.so 2>/dev/null | head -1)
      [ -n "$built" ] && gzip -c "$built" > "$RES/gsplat_cuda.so.gz" && log "gsplat built: $RES/gsplat_cuda.so.gz" ;;
    gen)
      # shellcheck disable=SC2086
      step gen splatsem-synthetic --out /tmp/coll --num-scenes "${NSCENES:-300}" --seed 0 --width 320 --height 240 $GEN_ARGS ;;
    real)  # each carried ScanNet capture of $SCANNET, held out
      for pair in $SCANNET; do
        name=${pair%%:*}; scene=${pair#*:}
        [ -d "$SPLATSEM_DATA/$scene" ] && step "$name" splatsem-collection --scenes "$SPLATSEM_DATA/$scene" \
          --test-scenes "$scene" --out "/tmp/$name/collection.json"
      done
      # An unlabelled real capture (7-Scenes redkitchen at 320x240) mixed into the generated training rooms, for
      # semantic-splat trained "with real scenes mixed in" (step mixedsemantic), scored on ScanNet, which it never sees
      if [ -d "$SPLATSEM_DATA/redkitchen_7scenes_small" ]; then
        step mixed splatsem-collection --scenes "$SPLATSEM_DATA/redkitchen_7scenes_small" --val-fraction 0 \
          --test-fraction 0 --include /tmp/coll/collection.json --out /tmp/mixed/collection.json
      fi ;;
    encoder)
      # shellcheck disable=SC2086
      step encoder python benchmarks/chorus_encoder.py --collection /tmp/coll/collection.json \
        $(real_collections) --out "$RES/encoder" --steps "${ENC_STEPS:-856}" \
        --minutes "${ENC_MIN:-8}" --decay-steps "${ENC_DECAY:-750}" --loader-workers 8 --extraction-workers 8 \
        --save-checkpoint --probe-max-scenes 40 $ENC_ARGS ;;
    adapt)  # chorus-splat on ScanNet with the encoder just trained as its latent source, once per adapt scope in
      # AD_SCOPE, scored along the way (and once more at the end), after chorus-splat from scratch for as many steps
      config=$(find "$RES/encoder/runs" -name config.yml | head -1); log "adapting $config"
      runs=()
      for scope in ${AD_SCOPE:-latents head}; do
        runs+=("adapt_$scope=chorus-splat:semantic_source.kind=encoder,semantic_source.adapt=$scope,semantic_source.encoder_checkpoint=$config")
      done
      # shellcheck disable=SC2086
      step adapt python benchmarks/semantic_report.py --data "$SPLATSEM_DATA/scannet_scene0000_00" \
        --out "$RES/adapt" --iterations "${AD_ITERS:-5000}" --no-baseline --eval-at ${AD_EVAL:-0 500 2000} \
        --runs "scratch=chorus-splat" "${runs[@]}" ;;
    semantic)  # semantic-splat for SS_MIN minutes once per centred-term weight in SS_CENTRED, same seed and rooms
      semantic_settings
      for weight in ${SS_CENTRED:-0 1}; do
        step "semantic_centred_$weight" python benchmarks/semantic_splat.py --collection /tmp/coll/collection.json \
          --out "$RES/semantic_centred_$weight" "${semantic_run[@]}" --forward-repeats 5 \
          --model-set "centred_loss_weight=$weight" --save-checkpoint
      done ;;
    ffinit)  # chorus-splat on the ScanNet capture from the last semantic-splat network's prediction, beside chorus-splat
      # from its seed points, scored along the way (does the feed-forward init help?)
      scene=$SPLATSEM_DATA/scannet_scene0000_00_dense; [ -d "$scene" ] || scene=$SPLATSEM_DATA/scannet_scene0000_00
      config=$(find "$RES"/semantic_centred_*/runs -name config.yml 2>/dev/null | sort | tail -1); log "feed-forward init from $config"
      # shellcheck disable=SC2086
      [ -n "$config" ] && step ffinit python benchmarks/semantic_report.py --data "$scene" --out "$RES/ffinit" \
        --iterations "${FF_ITERS:-3000}" --no-baseline --eval-at ${FF_EVAL:-0 500 1500} \
        --runs "scratch=chorus-splat" "ffinit=chorus-splat:pipeline.feedforward_init=$config" ;;
    mixedsemantic)  # the same with the real capture of the `real` step mixed into training at a share of SS_MIXED
      [ -f /tmp/mixed/collection.json ] || { log "mixedsemantic: no mixed collection (redkitchen not carried)"; continue; }
      semantic_settings
      step semantic_mixed python benchmarks/semantic_splat.py --collection /tmp/mixed/collection.json \
        --out "$RES/semantic_mixed" "${semantic_run[@]}" --forward-repeats 1 --unlabelled-scenes geometry \
        --real-share "${SS_MIXED:-0.1}" --model-set "centred_loss_weight=${SS_MIXED_CENTRED:-1}" ;;
    speed)
      # shellcheck disable=SC2086
      step speed python benchmarks/train_speed.py --data "$SPLATSEM_DATA/scannet_scene0000_00" --out "$RES/speed" \
        --iterations "${SPEED_ITERS:-2000}" --random-weights --repeats "${SPEED_REPEATS:-3}" \
        --interleave "${SPEED_INTERLEAVE:-0}" --methods ${SPEED_METHODS:-splatfacto chorus-splat} ;;
    query)  # relevancy frames per second at full resolution, every path side by side in one process
      step query python benchmarks/query_speed.py --out "$RES/query" ;;
    profile)  # where a training step's host and GPU time go, splatfacto beside chorus-splat
      step profile python benchmarks/profile_iteration.py --data "$SPLATSEM_DATA/scannet_scene0000_00" \
        --out "$RES/profile" --method splatfacto chorus-splat --random-weights ;;
    memory)  # what peak training memory holds, splatfacto beside chorus-splat
      step memory python benchmarks/memory_peak.py --data "$SPLATSEM_DATA/scannet_scene0000_00" --out "$RES/memory" \
        --method splatfacto chorus-splat --random-weights --start "${MEM_START:-1500}" ;;
    capacity)  # the encoder fitted to the generated training rooms' labelled points by cross-entropy (no teacher,
      # no rendering), scored on the held-out rooms and on ScanNet: what procedural supervision gives a real room at
      # best (both ScanNet captures hold the same labelled points, so only the first one carried is scored).
      # Rooms whole, as chorus-pretrain serves them: a random subset would thin them unlike the real room.
      reals=(); for pair in $SCANNET; do [ -d "$SPLATSEM_DATA/${pair#*:}" ] && reals=("$SPLATSEM_DATA/${pair#*:}") && break; done
      # shellcheck disable=SC2086
      step capacity python benchmarks/encoder_capacity.py --collection /tmp/coll/collection.json --out "$RES/capacity" \
        --use-splits --train-scenes "${CAP_TRAIN:-275}" --test-scenes 16 --steps "${CAP_STEPS:-3000}" --score-every 500 \
        --max-points 1000000 --score-train-scenes 32 --augment --real-scenes "${reals[@]}" $CAP_ARGS ;;
    ddp)
      # shellcheck disable=SC2086
      step ddp python benchmarks/ddp_scaling.py ${DDP_ARGS:---collection /tmp/coll/collection.json --gpus 1 2 4 \
        --global-batch 8 --steps 1000 --seed-noise-runs 1 --profile-at 600} --out "$RES/ddp" ;;
    gputests)  # the tests that only run on a GPU (pytest's gpu marker), with skips and failures named
      step gputests python -m pytest -q -p no:cacheprovider -rsf -m gpu tests ;;
    *) log "unknown step $s" ;;
    esac
  done
  log "chain done"; touch "$RES/DONE" ;;
*)
  sed -n '2,21p' "$0"; exit 2 ;;
esac
