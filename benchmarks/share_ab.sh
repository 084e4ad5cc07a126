# Sharing one GPU, measured (docs/performance.md, "Sharing a GPU between stages"): the projector half of the
# DTD-shaped job at a third of its size (--per-class 40: 627 train / 627 test images, the 47 classes), weights in a
# bucket (SeaweedFS on the machine), defaults otherwise. RUN=A one stage at a time (its manifests record each
# stage's own peak GPU memory); RUN=B the same job with --share-gpu 3 and A's records, on the same warm machine (a
# second call). Each run gets fresh torch.compile caches (the bucket's compile cache is emptied with the run), so B
# is not warmer than A.
export PYTHONUNBUFFERED=1
python3 -c "import s3fs, deepspeed, open_clip" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.site:/tmp/site PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g; nproc; } > "$OUT/card-$RUN.txt" 2>&1
extra=()
if [ "$RUN" = B ]; then
    [ -f /tmp/share-A.json ] || { echo "RUN=B needs RUN=A's records on this machine (/tmp/share-A.json)"; exit 3; }
    extra=(--share-gpu 3 --stage-times /tmp/share-A.json)
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader -lms 500 > "$OUT/nvidia-smi-$RUN.csv" &
TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$RUN TRITON_CACHE_DIR=/tmp/triton-$RUN timeout -k 10 $((580 - SECONDS)) \
    python3 -m mysproj.cli bench pipeline --dataset-shape dtd --per-class 40 --gpus 1 --weights-in s3 \
    --strategies projector --work /tmp/bp $JOB_EXTRA "${extra[@]}" --json-out "$OUT/share-$RUN.json" \
    --log "$OUT/share-$RUN.log" > "$OUT/share-$RUN.out" 2>&1
echo "run $RUN rc=$? at $SECONDS s"; grep "^total:" "$OUT/share-$RUN.out"; cp "$OUT/share-$RUN.json" /tmp/
grep -i "error\|crashed\|failed\|still allocated" "$OUT/share-$RUN.out" | head -5
