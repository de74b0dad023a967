#!/usr/bin/env bash
# System tools for the cluster launch tests (tests/test_launch_cluster.py): Slurm and munge from the
# distribution's packages, Open MPI for mpirun. Debian/Ubuntu; run as root (or with sudo).
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client munge openmpi-bin)
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${missing[@]}" \
    || { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }
