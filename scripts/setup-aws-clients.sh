#!/usr/bin/env bash
# The outside AWS clients the AWS-compatibility tests drive (issue 14, docs/aws.md), installed
# idempotently and quickly when present; called by scripts/setup.sh, runs without stdin:
#
#   .cache/venv                      a Python venv with boto3 (and its botocore, which ships the
#                                    `lambda-microvms` 2025-09-09 model), from the pip index this
#                                    machine is configured with (pip.conf / PIP_* variables: the local
#                                    mirror; PyPI itself is not reachable, hence --retries 0)
#   .cache/aws-data/lambda-microvms/2025-09-09/
#                                    that model unpacked (service-2.json, paginators-1.json,
#                                    endpoint-rule-set-1.json), for AWS_DATA_PATH: the AWS CLI v1 this
#                                    machine has (and Debian's awscli 2.9) carries an older botocore
#                                    without the service and loads it from there
#   aws                              the AWS CLI: kept when one is on PATH (here: pip-installed into the
#                                    machine's Python); otherwise Debian's `awscli` package (apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/apt.sh
. scripts/lib/apt.sh

BOTO3_VERSION=1.43.107
VENV=.cache/venv
MODEL_DIR=.cache/aws-data/lambda-microvms/2025-09-09
# Debian's own Python, not whatever python3 comes first on PATH: the venv must not depend on a
# per-user interpreter (pyenv and the like) that a fresh machine does not have.
PYTHON=/usr/bin/python3

# python3-venv brings ensurepip for Debian's python3 (`python3 -m venv` fails without it).
if [ ! -x "$PYTHON" ] || ! dpkg -s python3-venv >/dev/null 2>&1; then
  apt_install python3 python3-venv
fi

# The stamp records what the venv was made with; anything else (or a broken venv) is remade.
stamp="$VENV/.cocoon-boto3"
want="boto3==$BOTO3_VERSION $($PYTHON --version 2>&1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "making $VENV with boto3==$BOTO3_VERSION from the configured pip index"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --retries 0 --quiet --disable-pip-version-check "boto3==$BOTO3_VERSION" >&2
  "$VENV/bin/python" -c "import boto3; assert boto3.__version__ == '$BOTO3_VERSION', boto3.__version__"
  echo "$want" > "$stamp"
  rm -rf "$MODEL_DIR"
fi

# The model for AWS_DATA_PATH, unpacked from the venv's botocore (the same bytes boto3 uses).
if [ ! -s "$MODEL_DIR/service-2.json" ] || [ ! -s "$MODEL_DIR/paginators-1.json" ] || [ ! -s "$MODEL_DIR/endpoint-rule-set-1.json" ]; then
  say "unpacking the lambda-microvms model into $MODEL_DIR (for AWS_DATA_PATH)"
  "$VENV/bin/python" - "$MODEL_DIR" <<'PYTHON'
import gzip, os, sys
import botocore
src = os.path.join(os.path.dirname(botocore.__file__), 'data', 'lambda-microvms', '2025-09-09')
dst = sys.argv[1]
os.makedirs(dst, exist_ok=True)
for name in ('service-2.json', 'paginators-1.json', 'endpoint-rule-set-1.json'):
    path = os.path.join(src, name)
    data = open(path, 'rb').read() if os.path.exists(path) else gzip.open(path + '.gz').read()
    with open(os.path.join(dst, name + '.tmp'), 'wb') as out:
        out.write(data)
    os.replace(os.path.join(dst, name + '.tmp'), os.path.join(dst, name))
PYTHON
fi

# The AWS CLI. Debian's awscli 2.9 also takes the model through AWS_DATA_PATH.
if ! command -v aws >/dev/null 2>&1; then
  apt_install awscli
fi
