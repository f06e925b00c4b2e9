# Sourced by the scripts: lets OpenMPI run as root (CI and containers run as
# root) and oversubscribe this machine's few cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
# Single-node transports only: on this machine, probing for UCX/OFI network
# transports adds ~0.2 s to every MPI_Init. Clusters keep their site settings.
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_mtl=^ofi OMPI_MCA_osc=^ucx
