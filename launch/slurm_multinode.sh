#!/usr/bin/env bash
# Multi-node training under SLURM: one task per node, each runs `accelerate launch` for its GPUs.
#   sbatch launch/slurm_multinode.sh train/stage1.py --config configs/stage1/qwen3_8b.yaml --output-dir runs/x
#SBATCH --job-name=tpembed
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
export GPUS_PER_NODE MAIN_PROCESS_IP MAIN_PROCESS_PORT
# srun starts one copy per node; SLURM_NODEID is that node's machine rank
srun --kill-on-bad-exit=1 bash -c 'accelerate launch \
    --config_file launch/multi_node.yaml \
    --num_machines "$SLURM_NNODES" \
    --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "$MAIN_PROCESS_PORT" \
    "$@"' _ "$@"
