#!/usr/bin/env bash
# Reproduce experiments/video_shapes (from the repository root):
#   bash experiments/video_shapes/run.sh vae        # the moving-shapes video VAE, exported into the package
#   bash experiments/video_shapes/run.sh wan_vae    # the same recipe for Wan's VAE (conf/video_vae/wan.yaml)
#   bash experiments/video_shapes/run.sh t2v [N]    # text-to-video (experiment=t2v_shapes): 5000 steps, resumed to N (10000), judged on 256 clips
#   bash experiments/video_shapes/run.sh i2v [N]    # image-to-video (model=video_i2v) for N steps, judged likewise
#   bash experiments/video_shapes/run.sh wan_t2v [SEED]   # Wan text-to-video (experiment=wan_t2v_shapes): 5000 steps,
#                                                          # resumed to 10000, judged on seeds 0-255 and 256-511
#   bash experiments/video_shapes/run.sh wan_i2v    # Wan image-to-video (experiment=wan_i2v_shapes), 2000 steps
#   bash experiments/video_shapes/run.sh wan_turbo  # Turbo on the wan_t2v teacher, judged at 1 and 4 steps
#   bash experiments/video_shapes/run.sh wan_t2v_20k [SEED]  # the wan_t2v run resumed to 20000 steps, judged likewise
#   bash experiments/video_shapes/run.sh wan_i2v_from_t2v [SEED]  # image-to-video from the 10000-step text-to-video
#                                                                 # export: 2000 steps, resumed to 6000, judged held out
#   bash experiments/video_shapes/run.sh wan_turbo_patchgan [SEED]  # Turbo with a clip PatchGAN, judged at 1, 2, 4 steps
set -euo pipefail
stages="vae | wan_vae | t2v | i2v | wan_t2v | wan_i2v | wan_turbo | wan_t2v_20k | wan_i2v_from_t2v | wan_turbo_patchgan"
stage=${1:?$stages}
steps=${2:-3000}
case "$stage" in
vae)
    # reconstruction (L1 + KL) only: the adversarial phase cost the first cut colour and shape (README)
    python train.py model=autoencoder data=moving_shapes run_name=vae_moving_shapes logger=csv trainer.max_steps=4000 \
        model.disc_start=100000 data.batch_size=8 callbacks.samples.every_n_steps=500 callbacks.samples.num_images=16 \
        callbacks.samples.final_num_images=64
    python sample.py ckpt=outputs/vae_moving_shapes/checkpoints/last.ckpt \
        export=src/lightdiff/assets/vae_moving_shapes overwrite=true
    ;;
wan_vae)
    # the same recipe, 5000 steps (at 3000: 28.3 dB and 41% of clips keeping shape and colour, still rising; README)
    python train.py model=autoencoder data=moving_shapes video_vae@model.video_vae=wan run_name=vae_moving_shapes_wan \
        logger=csv trainer.max_steps=5000 model.disc_start=100000 data.batch_size=8 callbacks.samples.every_n_steps=500 \
        callbacks.samples.num_images=16 callbacks.samples.final_num_images=64
    python sample.py ckpt=outputs/vae_moving_shapes_wan/checkpoints/last.ckpt \
        export=src/lightdiff/assets/vae_moving_shapes_wan overwrite=true
    ;;
t2v | i2v)
    run=video_shapes_$stage
    if [ "$stage" = t2v ]; then  # model=video at the size and batch that fit the task (conf/experiment/t2v_shapes.yaml)
        # the measured recipe's two legs: 5000 steps, then resumed to 10000 with the cosine stretched (t2v_shapes.yaml)
        python train.py experiment=t2v_shapes run_name=$run logger=csv trainer.max_steps=5000
        python train.py experiment=t2v_shapes run_name=$run logger=csv trainer.max_steps="${2:-10000}"
    else
        python train.py model=video_i2v run_name=$run logger=csv trainer.max_steps="$steps" \
            callbacks.samples.every_n_steps=1000
    fi
    # 256 clips of seeds 0..255 (prompts cycle through the 96 captions; i2v: the data's first frames are not a prompt,
    # so sample.py draws from one frame: the training previews' final_metrics.json judges 256 data frames instead)
    if [ "$stage" = t2v ]; then
        python sample.py ckpt=outputs/$run/checkpoints/last.ckpt out=outputs/$run/judged num_images=256 \
            batch_size=64 steps=50 guidance_scale=1.5 metrics=fid metrics.num_samples=256 overwrite=true
        cat outputs/$run/judged/metrics.json
    fi
    cat outputs/$run/final_metrics.json
    ;;
wan_t2v)
    # CogVideoX's recipe (t2v_shapes: 5000 steps, resumed to 10000) with the Wan transformer, at its size
    seed=${2:-0}
    run=wan_t2v_shapes$([ "$seed" = 0 ] || echo "_seed$seed")
    python train.py experiment=wan_t2v_shapes seed="$seed" run_name=$run logger=csv trainer.max_steps=5000
    python train.py experiment=wan_t2v_shapes seed="$seed" run_name=$run logger=csv trainer.max_steps=10000
    for first in 0 256; do  # seeds 0-255, then the held-out 256-511 (guidance 1.5 was chosen on CogVideoX's 0-255)
        python sample.py ckpt=outputs/$run/checkpoints/last.ckpt out=outputs/$run/judged_$first seed=$first \
            num_images=256 batch_size=64 steps=50 guidance_scale=1.5 metrics=fid metrics.num_samples=256 overwrite=true
        cat outputs/$run/judged_$first/metrics.json
    done
    ;;
wan_i2v)
    # each clip from its data clip's first frame, moving as its caption says: the training run's final previews judge
    # 256 data first frames (seeds 0-255) against their captions (direction right = the caption's)
    python train.py experiment=wan_i2v_shapes logger=csv
    cat outputs/wan_i2v_shapes/final_metrics.json
    ;;
wan_turbo)
    python train.py experiment=wan_turbo_shapes model.teacher=outputs/wan_t2v_shapes/checkpoints/last.ckpt logger=csv
    for steps in 1 4; do
        python sample.py ckpt=outputs/wan_turbo_shapes/checkpoints/last.ckpt out=outputs/wan_turbo_shapes/judged_$steps \
            seed=256 num_images=256 batch_size=64 steps=$steps guidance_scale=1 metrics=fid metrics.num_samples=256 \
            overwrite=true
        cat outputs/wan_turbo_shapes/judged_$steps/metrics.json
    done
    ;;
wan_t2v_20k)
    # the 10000-step run (run.sh wan_t2v [SEED]) resumed with trainer.max_steps=20000: the cosine is recomputed for
    # 20000 steps (a warm restart at its half-way rate), as the CogVideoX recipe's second leg; the 10000 checkpoint is kept
    seed=${2:-0}
    run=wan_t2v_shapes$([ "$seed" = 0 ] || echo "_seed$seed")
    [ -f outputs/$run/step10000_kept.ckpt ] || cp outputs/$run/checkpoints/step0010000.ckpt outputs/$run/step10000_kept.ckpt
    python train.py experiment=wan_t2v_shapes seed="$seed" run_name=$run logger=csv trainer.max_steps=20000
    # guidance chosen on seeds 0-255 among 1.5, 2 and 3 (README: 3), each reported on the held-out 256-511 too
    for guidance in 1.5 2.0 3.0; do
        for first in 0 256; do
            python sample.py ckpt=outputs/$run/checkpoints/last.ckpt \
                out=outputs/$run/judged20k_${first}_g$guidance seed=$first num_images=256 batch_size=64 \
                steps=50 guidance_scale=$guidance metrics=fid metrics.num_samples=256 overwrite=true
            cat outputs/$run/judged20k_${first}_g$guidance/metrics.json
        done
    done
    ;;
wan_i2v_from_t2v)
    # Wan's own order: the image-to-video model starts from the text-to-video one (its 10000-step EMA export);
    # 2000 steps, then resumed to 6000 (the cosine stretched: a warm restart), judged on held-out first frames
    seed=${2:-0}
    run=wan_i2v_from_t2v_shapes$([ "$seed" = 0 ] || echo "_seed$seed")
    [ -d outputs/wan_t2v_shapes/export_10000 ] || python sample.py ckpt=outputs/wan_t2v_shapes/step10000_kept.ckpt \
        export=outputs/wan_t2v_shapes/export_10000 overwrite=true
    for max_steps in 2000 6000; do
        python train.py experiment=wan_i2v_from_t2v_shapes model.pretrained=outputs/wan_t2v_shapes/export_10000 \
            seed="$seed" run_name=$run logger=csv trainer.max_steps=$max_steps
        cat outputs/$run/final_metrics.json
    done
    python experiments/video_shapes/judge_i2v.py outputs/$run/checkpoints/last.ckpt --out outputs/$run/heldout.json
    cat outputs/$run/heldout.json
    ;;
wan_turbo_patchgan)
    seed=${2:-0}
    run=wan_turbo_patchgan_shapes$([ "$seed" = 0 ] || echo "_seed$seed")
    python train.py experiment=wan_turbo_patchgan_shapes model.teacher=outputs/wan_t2v_shapes/step10000_kept.ckpt \
        seed="$seed" run_name=$run logger=csv
    for steps in 1 2 4; do  # held-out seeds 256-511
        python sample.py ckpt=outputs/$run/checkpoints/last.ckpt out=outputs/$run/judged_$steps seed=256 \
            num_images=256 batch_size=64 steps=$steps guidance_scale=1 metrics=fid metrics.num_samples=256 overwrite=true
        cat outputs/$run/judged_$steps/metrics.json
    done
    ;;
*)
    echo "unknown stage $stage ($stages)" >&2
    exit 2
    ;;
esac
