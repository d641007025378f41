#!/bin/bash
# LMM (the neural memory alone), 760M parameters, 30B tokens of FineWeb-Edu, on 2 nodes x 8 GPUs.
#   sbatch [--partition=P --account=A] slurm/lmm_760m.sh data.data_dir=SHARDS data.tokenizer=TOKENIZER.model [key=value ...]
# The job saves a checkpoint and requeues itself before its time limit; see docs/cluster.md.
#SBATCH --job-name=lmm_760m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
RECIPE=lmm_760m
source "${TITANS_SCALE_HOME:-$SLURM_SUBMIT_DIR}/slurm/_launch.sh" "$@"
