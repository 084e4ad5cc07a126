# Sharing one GPU, measured A/B in one call on one machine: the projector half of the DTD-shaped job (40 images a
# class: 627 train / 627 test), weights in a bucket (SeaweedFS here), first one stage at a time (A: its manifests
# record each stage's peak GPU memory), then with --share-gpu 3 from A's records (B). Each run gets fresh
# torch.compile caches so that B is not warmer than A. decode=device for both where check_decode.py passes.
here=benchmarks/results/h100-2026-12-07d
export PYTHONUNBUFFERED=1
python3 -c "import s3fs, deepspeed, open_clip" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.site:/tmp/site PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total --format=csv; free -g; nproc; } > "$OUT/card.txt" 2>&1
timeout -k 10 90 python3 $here/check_decode.py "$OUT/check-decode.json" 512 > "$OUT/check-decode.out" 2>&1 \
    && sets=(--set probe.decode=device --set eval-llava.decode=device --set eval-clip.decode=device)
echo "check rc=$? at $SECONDS s"; tail -1 "$OUT/check-decode.out"
job=(--dataset-shape dtd --per-class 40 --gpus 1 --weights-in s3 --strategies projector --work /tmp/bp "${sets[@]}"
     $JOB_EXTRA)  # JOB_EXTRA: the same script scaled down on a CPU, e.g. "--model-preset tiny --device-gib 24"
for run in A B; do
    extra=(); [ $run = B ] && extra=(--share-gpu 3 --stage-times "$OUT/share-A.json")
    limit=300; [ $run = B ] && limit=$((585 - SECONDS))
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$run TRITON_CACHE_DIR=/tmp/triton-$run timeout -k 10 $limit \
        python3 -m mysproj.cli bench pipeline "${job[@]}" "${extra[@]}" --json-out "$OUT/share-$run.json" \
        --log "$OUT/share-$run.log" > "$OUT/share-$run.out" 2>&1
    echo "run $run rc=$? at $SECONDS s"; grep "^total:" "$OUT/share-$run.out"
done
