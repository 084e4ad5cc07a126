# The DTD job, weights in a bucket (SeaweedFS on this machine), on one GPU, in parts of the 10-minute command
# limit. Part 1 checks decode=device on the GPU first (check_decode.py); where it works the evaluations and probes
# decode there. On a card of >= 120 GiB (H200) both strategies, else (H100: full fine-tuning needs more host memory
# than is left beside the S3 server) the projector half. Part 2 goes on with --resume. Part "share": the same job
# again from the start with --share-gpu 3, memory from part 1's records.
part=${1:-1}
here=benchmarks/results/h200-2026-12-07
export PYTHONUNBUFFERED=1
[ -d /tmp/site/s3fs ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.site:/tmp/site PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total --format=csv; free -g; nproc; } > "$OUT/card-part$part.txt" 2>&1
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
strategies=projector,full; [ "$mib" -ge 122880 ] || strategies=projector
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader) $mib MiB -> strategies $strategies"
if [ "$part" = 1 ]; then
    timeout -k 10 120 python3 $here/check_decode.py "$OUT/check-decode.json" > "$OUT/check-decode.out" 2>&1 \
        && touch /tmp/decode-ok
    echo "check rc=$? at $SECONDS s"; tail -2 "$OUT/check-decode.out"
fi
sets=(); [ -e /tmp/decode-ok ] && sets=(--set probe.decode=device --set eval-llava.decode=device
                                        --set eval-clip.decode=device)
extra=(--strategies "$strategies")
case $part in
    1) ;;
    share) extra+=(--share-gpu 3 --stage-times /tmp/part1.json) ;;
    *) extra+=(--resume) ;;
esac
timeout -k 10 $((580 - SECONDS)) python3 -m mysproj.cli bench pipeline --dataset-shape dtd --gpus 1 --weights-in s3 \
    --work /tmp/bp "${extra[@]}" "${sets[@]}" --json-out "$OUT/dtd-s3-part$part.json" \
    --log "$OUT/dtd-s3-part$part.log" > "$OUT/dtd-s3-part$part.out" 2>&1
echo "pipeline rc=$? at $SECONDS s (${extra[*]} ${sets[*]})"
[ "$part" = 1 ] && cp "$OUT/dtd-s3-part1.json" /tmp/part1.json
grep -v "^{" "$OUT/dtd-s3-part$part.out" | grep -i "error\|failed\|done in\|total:" | tail -20
