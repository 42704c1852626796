#pragma once
// MoeLayer<backend::Cuda<V>, ..., P> for P = parallel::Data, Expert, Tensor or Hybrid over comm::Nccl
// (one GPU per rank): the same class as the single-GPU layer (backend/cuda/moe_layer.cuh) with the
// strategy composed in, and the same algorithm as the host one (parallel/host_moe_layer.hpp, which
// explains the rank grid, duplicate token dropping, the all-to-all and tp collectives and the gradient
// averaging): the exchange is parallel/exchange.hpp, written once for both backends, here over device
// buffers and NCCL on the caller's stream. The bookkeeping is the shared DispatchPlan; the permutation
// sorts rows chunk-major on the device (permute.cuh, chunks = tp). Include this header (it brings NCCL's)
// to make a distributed CUDA layer.
//
// Host synchronisations: still one per forward. Before it, on the stream: the per-expert counts of this
// rank's chunk (and its expert-side capacity) are all-gathered over the tp x ep ranks of its dp index,
// (GlobalBatch) the routed counts all-reduced over the shards, and a non-finite-logits flag summed over
// the world, into the stats block that the forward copies to the host anyway; so a rank with bad input
// or too small a workspace makes all the ranks it talks to throw together.
// Duplicate token dropping is fixed at construction (it decides the permutation's chunks).
// Workspace: the layer's own plus the expert side's, sized for ep·T·k rows (every row of every source
// could come to this rank's experts).
//
// STATUS: compiled, never run: no GPU (let alone several) has been lent to this project yet.
#include "moekit/backend/cuda/moe_layer.cuh"
#include "moekit/parallel/comm/nccl.cuh"
#include "moekit/parallel/dispatch_plan.hpp"
#include "moekit/parallel/exchange.hpp"
#include "moekit/parallel/grid.hpp"
#include "moekit/parallel/policy.hpp"
#include "moekit/parallel/sharding.hpp"
