#!/bin/bash
# rssqa ${STAGE} (profile ${PROFILE}): ${NODES} node(s) x ${GPUS} GPU(s) = world size ${WORLD_SIZE}
# Run this same script on every node with NODE_RANK set (0 .. ${NODES_MINUS_ONE}) and MASTER_ADDR naming node 0.
set -euo pipefail
cd ${PROJECT_DIR}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE} RSSQA_RUN_GROUP=${RUN_GROUP}
${PYTHON} -m torch.distributed.run \
  --nnodes=${NODES} --nproc-per-node=${GPUS} --node-rank=$${NODE_RANK:-0} \
  --master-addr=$${MASTER_ADDR:-127.0.0.1} --master-port=$${MASTER_PORT:-29500} \
  ${COMMAND}
