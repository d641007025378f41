# The shared body of the sbatch scripts in slurm/ (not submitted itself). A script sets RECIPE after its
# #SBATCH header and sources this file with its arguments:
#
#     RECIPE=mac_760m
#     source "${TITANS_SCALE_HOME:-$SLURM_SUBMIT_DIR}/slurm/_launch.sh" "$@"
#
# What it does, on the first node of the allocation:
# - runs from the checkout: $TITANS_SCALE_HOME, else the directory sbatch was called from;
# - starts one training process per task with srun (one task per GPU; RANK / LOCAL_RANK / WORLD_SIZE come
#   from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS), meeting at the first node of the job
#   (MASTER_ADDR from `scontrol show hostnames`, MASTER_PORT from the job id);
# - writes to runs/<job name>-<job id> (the same directory after a requeue, so resume=auto continues);
#   pass run_dir=... to continue an earlier job's run in a new job;
# - forwards USR1 (from --signal=B:USR1@N, or `scancel --signal=USR1 --batch JOB`) and TERM to the ranks:
#   they finish the current step, save a checkpoint together and exit; after USR1 it requeues the job.
# Arguments are recipe overrides (key=value), passed on to `python -m titans_scale.launch`.
# Environment: PYTHON (default .venv/bin/python, else python3), TITANS_SCALE_HOME, RUN_DIR, MASTER_PORT,
# SRUN_WAIT (120), STOP_TIMEOUT (100); see docs/cluster.md.

set -euo pipefail
: "${RECIPE:?set RECIPE=<recipe name> before sourcing slurm/_launch.sh}"
: "${SLURM_JOB_ID:?slurm/_launch.sh runs inside a Slurm job: sbatch slurm/$RECIPE.sh}"

home=${TITANS_SCALE_HOME:-$SLURM_SUBMIT_DIR}
if [ ! -f "$home/titans_scale/launch.py" ]; then
  echo "error: $home is not a titans_scale checkout; run sbatch from the checkout or set TITANS_SCALE_HOME" >&2
  exit 2
fi
cd "$home"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Rendezvous: the first node of the job, a port derived from the job id (the same after a requeue).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# NCCL: fail fast on a broken collective instead of hanging until the time limit; the network is the
# cluster's business (set NCCL_SOCKET_IFNAME / NCCL_IB_HCA in your environment if it needs them).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

RUN_DIR=${RUN_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
for arg in "$@"; do  # a run_dir=... among the overrides wins (it is also passed on, last)
  case "$arg" in run_dir=*) RUN_DIR=${arg#run_dir=} ;; esac
done
echo "[slurm] job $SLURM_JOB_ID ($SLURM_JOB_NAME) run ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s)," \
     "$SLURM_NTASKS task(s), rendezvous $MASTER_ADDR:$MASTER_PORT | recipe=$RECIPE run_dir=$RUN_DIR $*"

# srun forwards the signals it gets to every task. The batch shell holds USR1 and TERM only to pass them
# on, and keeps waiting: the ranks finish the current step, save a checkpoint together and exit (with
# status 128 + the signal). After USR1 the shell then requeues the job, once every rank has exited; if
# they have not exited within STOP_TIMEOUT seconds (a hang at exit), it requeues anyway (resume=auto
# takes the newest complete checkpoint). After TERM (preemption, scancel, the time limit) Slurm decides.
export TITANS_REQUEUE_BY=batch
STOP_TIMEOUT=${STOP_TIMEOUT:-100}
requeue_at=""
srun_pid=""
forward() {
  echo "[slurm] caught SIG$1: passing it to the ranks (they stop after the current step with a checkpoint)"
  if [ "$1" = USR1 ] && [ -z "$requeue_at" ]; then requeue_at=$((SECONDS + STOP_TIMEOUT)); fi
  if [ -n "$srun_pid" ]; then kill -s "$1" "$srun_pid" 2>/dev/null || true; fi
}
requeue() {
  echo "[slurm] $1: requeueing job $SLURM_JOB_ID (the next run continues from the checkpoint in $RUN_DIR)"
  scontrol requeue "$SLURM_JOB_ID" || echo "[slurm] scontrol requeue failed: sbatch this script again with run_dir=$RUN_DIR"
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# --wait: once a task has exited, the others get SRUN_WAIT seconds to follow (a rank that crashed does not
# leave the rest hanging in a collective; ranks that stop together after a checkpoint are not cut short).
srun --kill-on-bad-exit=0 --wait="${SRUN_WAIT:-120}" "$PYTHON" -m titans_scale.launch "recipe=$RECIPE" "run_dir=$RUN_DIR" "$@" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do
  if [ -z "$requeue_at" ]; then
    wait "$srun_pid" || true  # returns early when a trapped signal arrives
  elif [ "$SECONDS" -lt "$requeue_at" ]; then
    sleep 1
  else
    requeue "the ranks did not exit within ${STOP_TIMEOUT}s of the signal"
    wait "$srun_pid" || true
  fi
done
status=0
wait "$srun_pid" || status=$?
echo "[slurm] training exited with status $status"
if [ -n "$requeue_at" ] && { [ "$status" = $((128 + $(kill -l USR1))) ] || [ "$status" = $((128 + $(kill -l USR2))) ]; }; then
  requeue "the ranks stopped with a checkpoint"
fi
exit "$status"
