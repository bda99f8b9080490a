#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run: well under 10 minutes on one H100 or H200.
# Needs torch, torchvision, h5py, numpy, tqdm and pillow, plus PyYAML (installed from .wheels/ when
# missing: `make gpu-wheels` fetches it); no nltk, pycocoevalcap or Java.
#
#   OUT=/tmp/gpu bash scripts/gpu_bench.sh            # bench matrix, DataLoader, DDP (NCCL, world size 1)
#   TINY=1 OUT=/tmp/gpu bash scripts/gpu_bench.sh     # the same steps on a tiny model, on the CPU, in a minute
set -euo pipefail
OUT=${OUT:-bench_out}
PY=${PY:-python}
mkdir -p "$OUT"
python_has() { "$PY" -c "import $1" 2>/dev/null; }
python_has yaml || "$PY" -m pip install -q --no-index --find-links .wheels pyyaml

if [ -n "${TINY:-}" ]; then
    DEVICE=cpu; IMAGES=64; SIZE=64; BENCH=(--tiny); TRAIN=(--encoder resnet18 --encoder_stages 2 --encoded_size 4)
else
    DEVICE=cuda; IMAGES=4000; SIZE=256; BENCH=(); TRAIN=(--encoder resnet101 --encoder_stages 4 --encoded_size 14)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

# Real prepared images at the reference experiment's 256 px, for the DataLoader's read rate and the DDP run.
DATA="$OUT/data"
"$PY" create_input_files.py --dataset shapes --output-folder "$DATA" --num-images "$IMAGES" \
    --image-size "$SIZE" --min-word-freq 0 --overwrite > "$OUT/prepare.log"
NAME=shapes_5_cap_per_img_0_min_word_freq

# The matrix: every decoder x fp32/fp16/bf16 x frozen/fine-tuned/cached x accumulation 1/2, on
# the reference model (ResNet-101, 256 px, 14x14, 512-d), batch 32; decoding at beam 1/3/5; the loader.
"$PY" bench.py --device "$DEVICE" "${BENCH[@]}" --data-folder "$DATA" --data-name "$NAME" --profile \
    --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

# Batches of similar length (length_pool 50) against random ones, the shapes captions' lengths, and each
# decoder's decoding step compiled (torch.compile, dynamic shapes) beside eager: fp32, cached features.
"$PY" bench.py --device "$DEVICE" "${BENCH[@]}" --data-folder "$DATA" --data-name "$NAME" --precision fp32 \
    --encoder-mode cached --accumulation 1 --length-pool 0 50 --beam-size 3 --compile-decoding \
    --out "$OUT/bench_pool.json" 2>&1 | tee "$OUT/bench_pool.log"

# The NCCL code path under torchrun with world size 1 (fp16 autocast, fine-tuned encoder, 30 steps).
"$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py --config configs/shapes.yaml \
    --data_folder "$DATA" --data_name "$NAME" --encoder_weights none "${TRAIN[@]}" --coord_channels false \
    --fine_tune_encoder true --amp true --device "$DEVICE" --max_steps 30 --epochs 1 --workers 4 \
    --val_max_images 64 --out "$OUT/ddp" --overwrite 2>&1 | grep -v "batch/s" | tail -40 | tee "$OUT/ddp.log"
echo "gpu_bench done: $OUT"
