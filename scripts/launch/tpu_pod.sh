#!/bin/bash
# dferjax on a Cloud TPU pod slice (e.g. v5p-32: 4 TPU VMs): the same command on every worker; JAX detects the
# slice (coordinator, process count and id) from the TPU VM metadata, so --distributed needs nothing else.
#
#   TPU=my-v5p-32 ZONE=us-east5-a scripts/launch/tpu_pod.sh configs/stt_dfew.py:fold=1 /shared/runs/stt_fold1 \
#       --config.dataset.data_dir=/shared/tensorflow_datasets
#
# Each worker must hold the repository at ~/dferjax with its .venv (pip install -e '.[tpu]'), and see the
# workdir and dataset at the same paths: a Filestore/NFS mount, or a bucket mounted with Cloud Storage FUSE
# (gcsfuse) on every worker; gs:// URLs are refused (docs/multihost.md). tests/test_distributed.py runs it with a
# gcloud that records the command it would send.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: TPU=name ZONE=zone $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
COMMAND="cd ~/dferjax && . .venv/bin/activate && python -m dferjax.main --distributed"
for arg in "--config=$1" "--workdir=$2" "${@:3}"; do COMMAND+=" $(printf '%q' "$arg")"; done  # quoted for the remote shell
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$COMMAND"
