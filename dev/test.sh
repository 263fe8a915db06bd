#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what it needs (dev/setup.sh),
# then runs pytest. The Slurm tests start a real single-host Slurm (dev/slurm-single-host.sh)
# from a session fixture, so this must run as root. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
exec .venv/bin/python -m pytest "$@"
