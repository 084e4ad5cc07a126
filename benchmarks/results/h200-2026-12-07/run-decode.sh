# decode=device on a GPU: pixels and images/s against the CPU path (check_decode.py), then the probe's feature
# extraction with the 7B model's shapes, decode cpu vs device, in one process each (mysproj bench probe-features).
here=benchmarks/results/h200-2026-12-07
export PYTHONUNBUFFERED=1
[ -d /tmp/site/s3fs ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.site:/tmp/site PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total --format=csv; free -g; nproc; } > "$OUT/card.txt" 2>&1
timeout -k 10 80 python3 $here/check_decode.py "$OUT/check-decode.json" > "$OUT/check-decode.out" 2>&1
echo "check rc=$? at $SECONDS s"; tail -3 "$OUT/check-decode.out"
for decode in device cpu; do
    timeout -k 10 $((240 - SECONDS)) python3 -m mysproj.cli bench probe-features --preset llava-1.5-7b --warmup 2 --steps 6 \
        --set decode=$decode --json-out "$OUT/probe-features-$decode.json" > "$OUT/probe-features-$decode.out" 2>&1
    echo "probe-features decode=$decode rc=$? at $SECONDS s"; tail -4 "$OUT/probe-features-$decode.out"
done
