#pragma once
// MoeLayer<backend::Host<T>, ..., P> for P = parallel::Data, Expert, Tensor or Hybrid (docs/design.md §5): the
// host layer over a communicator (comm::Mpi between processes, comm::Single for one). The world is
// tp x ep x dp ranks, tp fastest: rank = t + tp·(e + ep·d). Ranks of one tp group hold the same tokens;
// the ep·dp groups of a tp index hold different tokens ("shards", concatenated in shard order e + ep·d).
//
// Forward on each rank (local tokens x [T, D]):
//   router, top-k, capacity (per shard, as DeepSpeed), the zero-computation experts: all local (their
//   weights are replicated), so ZC tokens never travel;
//   Duplicate Token Dropping (DTD, DeepSpeed-TED): the tp ranks of a group hold the same tokens, so tp
//   rank t dispatches only the FFN rows of its 1/tp chunk of tokens;
//   counts: one all-gather of the per-expert row counts over the ranks of this dp index (tp x ep);
//   all-to-all-v over ep to the expert's owner; all-gather over tp (every tp rank computes its slice of
//   d_expert for all rows); local experts' FFN (W1/W3 rows t·f/tp.., W2 columns t·f/tp..); reduce-scatter
//   over tp (sums the slices, each rank keeps its chunk's rows); the reverse all-to-all-v; all-gather over
//   tp of the returned rows; combine by gather. Without DTD every tp rank dispatches all rows and the
//   slices are summed by an all-reduce over tp (tp times the all-to-all volume).
// Backward mirrors it (dgate needs no communication: every rank has all its tokens' expert rows).
// Communication-aware activation checkpointing: with set_activation_checkpointing(true) the forward
// keeps only the dispatched rows (the all-to-all outputs), and backward recomputes the expert
// activations from them without communicating again.
// Gradients accumulate locally over micro-batches; sync_gradients() (once per optimizer step, before
// it) sums expert gradients over dp and dense ones (router, gating residual, constant experts) over the
// world (tp replicas hold equal ones), and divides both to the mean over the ep·dp shards: the gradient
// of the mean of the shards' losses. Every rank must set the same duplicate token dropping.
// balance::GlobalBatch all-reduces the routed counts over the ep·dp ranks of this tp index (tp
// replicas counted once).
#include "moekit/backend/host/moe_layer.hpp"
#include "moekit/parallel/comm/communicator.hpp"
#include "moekit/parallel/exchange.hpp"
#include "moekit/parallel/grid.hpp"
#include "moekit/parallel/policy.hpp"
