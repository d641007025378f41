#!/bin/bash
# Try the Slurm path on CPUs: the tiny recipe as 2 tasks on one node (gloo), a few minutes of training.
#   sbatch slurm/tiny_cpu.sh [key=value ...]
#   scancel --signal=USR1 --batch JOBID   # checkpoint now, requeue, continue from the checkpoint
#SBATCH --job-name=tiny_cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
RECIPE=tiny
source "${TITANS_SCALE_HOME:-$SLURM_SUBMIT_DIR}/slurm/_launch.sh" "$@"
