#!/bin/bash
# rssqa ${STAGE} (profile ${PROFILE}): ${NODES} node(s) x ${GPUS} GPU(s) = world size ${WORLD_SIZE}
# Rendered by `make ${STAGE} PROFILE=${PROFILE} NODES=${NODES} GPUS=${GPUS} LAUNCHER=torchrun`.
# Run it on every node with NODE_RANK (0 .. ${NODES_MINUS_ONE}) and MASTER_ADDR (node 0's address) set;
# Lightning (and sqed, which shares out its units by rank) reads the ranks from torchrun's environment.
# A restarted job resumes from its checkpoints.
set -euo pipefail
cd ${PROJECT_DIR}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE} RSSQA_RUN_GROUP=${RUN_GROUP} TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
${PYTHON} -m torch.distributed.run \
  --nnodes=${NODES} --nproc-per-node=${GPUS} --node-rank=$${NODE_RANK:-0} \
  --master-addr=$${MASTER_ADDR:-127.0.0.1} --master-port=$${MASTER_PORT:-29500} \
  ${COMMAND}
