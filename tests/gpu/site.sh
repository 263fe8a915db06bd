# Sourced on the GPU machine by tests/gpu/shim.sh (bash): installs the wheels that
# dev/device-wheels.sh put in $REPO/.whl (carried there) into /tmp/hpcinfer-site, leaving the
# machine's own packages alone, and puts that on PYTHONPATH. Needs REPO; no .whl: a no-op.
# shellcheck shell=bash
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  if [[ ! -d /tmp/hpcinfer-site ]]; then
    python3 -m pip install --quiet --no-deps --no-index --target /tmp/hpcinfer-site \
      "$REPO"/.whl/*.whl || echo "tests/gpu/site.sh: installing .whl/*.whl failed" >&2
  fi
  export PYTHONPATH="/tmp/hpcinfer-site${PYTHONPATH:+:$PYTHONPATH}"
fi
