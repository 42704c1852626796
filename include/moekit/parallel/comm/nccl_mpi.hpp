#pragma once
// comm::Nccl::from_mpi: the NCCL communicator of an MPI group, its unique id sent by MPI_Bcast. Needs MPI
// (link moekit::mpi) and NCCL. Kept out of nccl.cuh so that Nccl has the same members in every
// translation unit, whether or not it sees <mpi.h>.
#include <mpi.h>

#include <string>

#include "moekit/parallel/comm/nccl.cuh"

namespace moekit::comm {

namespace detail {
inline void nccl_mpi_check(int err, const char* call) {
  if (err == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(err, msg, &len);
  throw CommError(std::string("moekit::comm::Nccl::from_mpi: ") + call + " failed: " + std::string(msg, std::size_t(len)));
}
}  // namespace detail

template <class MpiComm>
Nccl Nccl::from_mpi(const MpiComm& c, double timeout_s) {
  MPI_Comm comm;
  if constexpr (requires { c.native(); }) comm = MPI_Comm(c.native());  // a wrapper such as comm::Mpi
  else comm = c;
  int rank = 0, size = 0;
  detail::nccl_mpi_check(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  detail::nccl_mpi_check(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  struct IdMessage {
    ncclUniqueId id;
    int status;  // rank 0's ncclResult_t from ncclGetUniqueId
  } msg{};
  std::string why;
  if (rank == 0) {
    msg.status = int(ncclGetUniqueId(&msg.id));
    why = last_error(nullptr);
  }
  detail::nccl_mpi_check(MPI_Bcast(&msg, int(sizeof msg), MPI_BYTE, 0, comm), "MPI_Bcast of the ncclUniqueId");
  if (msg.status != int(ncclSuccess))
    throw CommError("moekit::comm::Nccl::from_mpi: ncclGetUniqueId failed on rank 0: " +
                    std::string(ncclGetErrorString(ncclResult_t(msg.status))) + why);
  return Nccl(msg.id, size, rank, timeout_s);
}

}  // namespace moekit::comm
