#pragma once
// How an example trainer starts: OpenMP's wait policy, thread counts per rank, the ranks mpirun started.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <exception>

#include <moekit/core/error.hpp>

#ifdef MOEKIT_EXAMPLE_HAS_MPI
#include <moekit/parallel/comm/mpi.hpp>
#endif

// OpenMP threads busy-wait between parallel regions by default. On a small machine shared with other
// jobs that turns every barrier into a wait for a descheduled thread (20x slower steps, measured on a
// loaded 2-core VM), so unless the user chose a policy, restart once with OMP_WAIT_POLICY=passive:
// libgomp reads the variable only when it loads.
inline void prefer_passive_openmp(char** argv) {
#ifdef __linux__
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  setenv("OMP_WAIT_POLICY", "passive", 1);
  execv("/proc/self/exe", argv);  // returns only on failure: carry on with the default policy
#else
  (void)argv;
#endif
}

inline void set_threads(int n) {
  omp_set_num_threads(n);
#ifdef OPENBLAS_VERSION
  openblas_set_num_threads(n);  // BLAS and the OpenMP loops take turns on the same cores
#endif
}

// This rank's place among the ranks on its node (MPI_COMM_TYPE_SHARED): {rank, size}. Collective.
#ifdef MOEKIT_EXAMPLE_HAS_MPI
struct NodeRanks {
  int rank = 0, size = 1;
};
inline NodeRanks node_ranks() {
  MPI_Comm node = MPI_COMM_NULL;
  NodeRanks n;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_rank(node, &n.rank);
    MPI_Comm_size(node, &n.size);
    MPI_Comm_free(&node);
  }
  return n;
}

// Threads per rank when the user chose none: the cores this rank may use, shared with the other ranks
// on its node (mpirun may bind each rank to its own cores already).
inline int threads_per_rank() { return std::max(1, omp_get_num_procs() / std::max(1, node_ranks().size)); }
#endif

// Ranks that mpirun (OpenMPI, MPICH, Slurm) started, from the environment: 1 when run directly.
inline int launcher_ranks() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char* e = std::getenv(v)) return std::max(1, std::atoi(e));
  return 1;
}

#ifdef MOEKIT_EXAMPLE_HAS_MPI
// A trainer under mpirun: MPI up, threads per rank (unless chosen), then run(world) -> exit status.
// Errors every rank meets alike (a ConfigError from the layers' agreed config, the trainer's
// NumericError, the checkpoint loader's agreed FormatError) are printed once, by rank 0, and exit 2;
// any other error may be one rank's alone while the others wait in a collective, so it ends the job.
template <class Run>
int run_under_mpi(int* argc, char*** argv, int threads, Run&& run) {
  moekit::comm::MpiSession session(argc, argv);
  int status = 2;
  {
    moekit::comm::Mpi world;  // freed (with everything split from it) before MPI_Finalize
    if (threads == 0 && std::getenv("OMP_NUM_THREADS") == nullptr) set_threads(threads_per_rank());
    auto agreed = [&](const std::exception& e) {
      if (world.rank() == 0) std::fprintf(stderr, "error: %s\n", e.what());
      status = 2;
    };
    try {
      status = run(world);
    } catch (const moekit::ConfigError& e) {
      agreed(e);
    } catch (const moekit::NumericError& e) {
      agreed(e);
    } catch (const moekit::FormatError& e) {
      agreed(e);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error (rank %d of %d): %s\n", world.rank(), world.size(), e.what());
      std::fflush(stderr);
      if (world.size() > 1) MPI_Abort(MPI_COMM_WORLD, 2);
      status = 2;
    }
  }
  return status;
}
#endif
