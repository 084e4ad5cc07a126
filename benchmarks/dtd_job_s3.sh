# The whole DTD job as a user runs it (goal: ≤ 8 minutes on one H200), every stage output, the models too, in a
# bucket: SeaweedFS on the machine's loopback, random 7B weights of the real shapes, defaults otherwise. A lent
# machine runs a command for at most 10 minutes, so the job runs in two calls, logs and JSON under $OUT:
#   PART=1  the projector half: every stage but full fine-tuning's three;
#   PART=2  on the same warm machine: the whole job with --resume, which keeps what part 1 finished (a kept stage
#           counts with the time its manifest recorded) and runs full fine-tuning, its evaluation and probe, and
#           the report. On a fresh machine (part 1's bucket gone) the full half alone instead (--strategies full
#           --no-zero-shot): its model-init, prep and zero-shot probe repeat part 1's and count once.
# `mysproj run --plan --gpus 1 --stage-times dtd-s3-part1.json --stage-times dtd-s3-part2.json ...` then gives
# the whole job's one-GPU schedule from the two records.
export PYTHONUNBUFFERED=1
python3 -c "import s3fs, deepspeed, open_clip" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.site:/tmp/site PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g; nproc; df -h /tmp; } \
    > "$OUT/card-part$PART.txt" 2>&1
job=(--dataset-shape dtd --gpus 1 --weights-in s3 --work /tmp/bp $JOB_EXTRA)  # JOB_EXTRA: e.g. a CPU trial's
if [ "$PART" = 1 ]; then job+=(--strategies projector)                          # "--model-preset tiny ..."
elif [ -d /tmp/bp/seaweedfs ]; then job+=(--resume)
else job+=(--strategies full --no-zero-shot); echo "part 2: fresh machine, the full half alone" > "$OUT/fresh.txt"
fi
timeout -k 10 $((580 - SECONDS)) python3 -m mysproj.cli bench pipeline "${job[@]}" \
    --json-out "$OUT/dtd-s3-part$PART.json" --log "$OUT/dtd-s3-part$PART.log" > "$OUT/dtd-s3-part$PART.out" 2>&1
echo "part $PART rc=$? at $SECONDS s"; grep "^total:" "$OUT/dtd-s3-part$PART.out"
grep -i "error\|crashed\|still allocated" "$OUT/dtd-s3-part$PART.out" | head -5
