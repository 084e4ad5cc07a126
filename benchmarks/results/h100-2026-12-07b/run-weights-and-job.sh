set -x
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.site:/tmp/site PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total --format=csv; free -g; df -h / /tmp; nproc; } > $OUT/card.txt 2>&1
timeout -k 10 220 python3 -m mysproj.cli bench weights --preset llava-1.5-7b --repeat 2 --work /tmp/bw --json-out $OUT/weights.json > $OUT/weights.log 2>&1
echo "weights rc=$? at $SECONDS s"
rm -rf /tmp/bw
timeout -k 10 $((575 - SECONDS)) python3 -m mysproj.cli bench pipeline --dataset-shape dtd --gpus 1 --weights-in s3 --work /tmp/bp --json-out $OUT/dtd-s3-part1.json --log $OUT/dtd-s3-part1.log > $OUT/dtd-s3-part1.out 2>&1
echo "pipeline rc=$? at $SECONDS s"; df -h /tmp; tail -5 $OUT/dtd-s3-part1.out
