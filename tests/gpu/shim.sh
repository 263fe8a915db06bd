# Sourced by the GPU scripts (needs REPO set): makes `import hpcinfer` with `hpcinfer.kernels`
# work from the checkout without a pip install, as pyproject's package-dir maps kernels/ to
# hpcinfer.kernels. Links the package and kernels/ into one tree in SCRATCH (removed on exit),
# puts SCRATCH first on PYTHONPATH and cds there, so the repo's own hpcinfer/ (which has no
# kernels/) is not first on sys.path.
# shellcheck shell=bash
SCRATCH=$(mktemp -d)
# shellcheck disable=SC2064  # expand SCRATCH now
trap "rm -rf '$SCRATCH'" EXIT
mkdir "$SCRATCH/hpcinfer"
ln -s "$REPO"/hpcinfer/* "$SCRATCH/hpcinfer/"
ln -s "$REPO/kernels" "$SCRATCH/hpcinfer/kernels"
export PYTHONPATH="$SCRATCH${PYTHONPATH:+:$PYTHONPATH}"
cd "$SCRATCH" || exit 1
# The wheels dev/device-wheels.sh put in .whl (xgrammar, peft, gguf, ...), when carried.
# shellcheck source=tests/gpu/site.sh
source "$REPO/tests/gpu/site.sh"
