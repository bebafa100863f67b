#!/usr/bin/env bash
# On the GPU machine: install the packages its image lacks and this checkout (editable, which
# compiles the native ring). Source it: `source perf/gpu_setup.sh`.
set -e
bash .device/setup.sh
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import livelm.native.ring, livelm.daemon.engine.engine; print('livelm importable')"
set +e
