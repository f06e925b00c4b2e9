# Sourced by the scripts: lets OpenMPI run as root (CI and containers run as
# root) and oversubscribe this machine's few cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
