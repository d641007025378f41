#!/bin/bash
# MAG (memory as gate), 400M parameters, 15B tokens of FineWeb-Edu, on 1 node x 8 GPUs.
#   sbatch [--partition=P --account=A] slurm/mag_400m.sh data.data_dir=SHARDS data.tokenizer=TOKENIZER.model [key=value ...]
# The job saves a checkpoint and requeues itself before its time limit; see docs/cluster.md.
#SBATCH --job-name=mag_400m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
RECIPE=mag_400m
source "${TITANS_SCALE_HOME:-$SLURM_SUBMIT_DIR}/slurm/_launch.sh" "$@"
