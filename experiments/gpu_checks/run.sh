#!/usr/bin/env bash
# Every check of issues 6 and 7 that needs a CUDA GPU, as ONE command for a lent GPU machine (device tool), sized to
# end inside one 10-minute call. Each stage has its own time limit and writes its log to $OUT as it goes, so a stage
# that runs long costs its own result, not the others'.
#
#   here:    bash experiments/gpu_checks/wheels.sh          (diffusers, Hydra, OmegaConf, torchao wheels into .whl/)
#   device, in two calls of at most 5.5 minutes (a stage that overruns then costs less of the 15 minutes):
#            run(command="LIGHTDIFF_COMMIT=<short HEAD> STAGES='tests train' bash experiments/gpu_checks/run.sh",
#                carry=[".whl"], timeout_s=330), then the same with STAGES='teacher sample mfu'
#            (issue 17's SDXL memory stage on its own: STAGES='sdxl_memory', timeout_s=120)
#   or in one call: the same without STAGES, timeout_s=600 (the stage limits add up to 700 s; typical is half)
#   here, on a CPU (checks the plumbing in seconds, every GPU stage shrunk): SMOKE=1 bash experiments/gpu_checks/run.sh
#
# Stages (seconds: their limits, 700 in all; on an H200 each should take well under its limit):
#   1. tests   (180) tests/test_gpu.py, tests/test_speed.py and the bf16 run test, on CUDA: FSDP trains, clips, logs
#                    train/grad_norm, writes whole-tensor checkpoints and resumes (issue 6); CUDA speed defaults on;
#                    compiled bf16 sampling passes its check; every speed switch's test on a GPU (issue 7)
#   2. train   (120) experiments/train_throughput: plain loop, diffusers example, lightdiff bare/defaults/speed path
#   3. sample  (150) experiments/sampling_speed: DDIMPipeline vs lightdiff eager vs speed path (bf16, compile),
#                    and with CUDA graphs, on a 400-step unconditional model trained first (teacher, 60)
#   4. mfu     (100) experiments/mfu: SD2-size UNet2DConditionModel, 32x32 latents, batch 32, compiled
#   5. sdxl_memory (90) experiments/sdxl_shapes/gpu_memory.py: peak memory of a real-size SDXL UNet step, 1024 px,
#                    batch 1, with each memory option (issue 17)
#   6. lora_memory (90) experiments/sdxl_shapes/gpu_lora_memory.py: peak memory and s/step of a LoRA step on a
#                    real-size SDXL UNet, 1024 px, its frozen base bf16 / int8 / NF4 / fp8-stored (issue 47)
# Results: $OUT/<stage>.log and $OUT/summary.md (versions, GPU, each stage's exit status and table).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/lightdiff_gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
COMMIT=${LIGHTDIFF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export LIGHTDIFF_COMMIT=$COMMIT

# -n 0: in one process (the suite's default is a worker per core: here they would share the one GPU)
TESTS=(-n 0 -m "gpu or not slow" tests/test_gpu.py tests/test_speed.py
  tests/test_training.py::test_gpu_run_uses_bf16_autocast_with_fp32_weights)
if [ "${SMOKE:-0}" = 1 ]; then
  # The same commands at toy sizes on a CPU: paths, flags and overrides are exercised, no figure is meaningful;
  # without --speed-path (compiling on a CPU takes minutes; tests/test_speed.py covers it there). The tests are
  # collected, not run: on a CPU they are the default suite's own, and its run already covers them.
  TESTS+=(--collect-only)
  TRAIN=(--steps 3 --warmup 1 --repeats 1 data.batch_size=8 data.resolution=16)
  TEACHER=(trainer.max_steps=3 data.batch_size=8)
  SAMPLE=(--steps 2 --repeats 1)
  MFU=(--count-only)
  SDXL=(--smoke)
  LORA=(--smoke)
else
  TRAIN=(--steps 40 --warmup 10 --repeats 2 --speed-path data.batch_size=256 net=unet_small data.resolution=32)
  TEACHER=(trainer=gpu trainer.max_steps=400 data.batch_size=64)
  SAMPLE=(--steps 50 --repeats 5 --speed-path)
  MFU=(--batch 32 --steps 20 --warmup 5)
  SDXL=(--resolution 1024 --batch 1)
  LORA=(--resolution 1024 --batch 1 --rank 32)
fi

summary=$OUT/summary.md
{
  echo "# GPU checks, commit $COMMIT, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, pytorch_lightning as pl, diffusers, transformers; print('torch', torch.__version__, \
'CUDA', torch.version.cuda, '| lightning', pl.__version__, '| diffusers', diffusers.__version__, \
'| transformers', transformers.__version__)"
} >"$summary" 2>&1

STAGES=${STAGES:-tests train teacher sample mfu sdxl_memory lora_memory}
stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log to $OUT/NAME.log, record the exit status
  local name=$1 limit=$2
  shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  {
    echo
    echo "## $name: exit $status after $((SECONDS - started)) s (limit $limit s)"
    grep -E '^\||passed|failed|skipped|error|MFU|TFLOP|machine:|^net ' "$OUT/$name.log" | tail -n 25
  } >>"$summary"
}

stage tests 180 $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}"
stage train 120 $PY experiments/train_throughput/benchmark.py "${TRAIN[@]}"
teacher_root=/tmp/lightdiff_gpu_teacher
[[ " $STAGES " == *" teacher "* ]] && rm -rf "$teacher_root"
stage teacher 60 $PY train.py output_root=$teacher_root run_name=teacher logger=csv callbacks.samples=null \
  "${TEACHER[@]}"
stage sample 150 $PY experiments/sampling_speed/benchmark.py --ckpt $teacher_root/teacher/checkpoints/last.ckpt "${SAMPLE[@]}"
stage mfu 100 $PY experiments/mfu/benchmark.py "${MFU[@]}"
stage sdxl_memory 90 $PY experiments/sdxl_shapes/gpu_memory.py "${SDXL[@]}"
stage lora_memory 90 $PY experiments/sdxl_shapes/gpu_lora_memory.py "${LORA[@]}"
cat "$summary"
