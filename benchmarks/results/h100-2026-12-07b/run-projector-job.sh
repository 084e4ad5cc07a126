export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.site:/tmp/site PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total --format=csv; free -g; nproc; } > $OUT/card.txt 2>&1
python3 -c "import open_clip, deepspeed, s3fs" || exit 2
timeout -k 10 $((560 - SECONDS)) python3 -m mysproj.cli bench pipeline --dataset-shape dtd --gpus 1 --weights-in s3 --strategies projector --work /tmp/bp --json-out $OUT/dtd-s3-part1.json --log $OUT/dtd-s3-part1.log > $OUT/dtd-s3-part1.out 2>&1
echo "pipeline rc=$? at $SECONDS s"; grep -v "^{" $OUT/dtd-s3-part1.out | grep -i "error\|failed\|done in" | tail -20
