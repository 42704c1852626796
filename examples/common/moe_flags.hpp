#pragma once
// The flags of the open models' routers and experts, shared by train_lm and train_domains. Each sets
// the MoeConfig field or policy option of the same name (docs/harness.md lists their meanings); the
// layer checks the values (a ConfigError names the key), and the layer types they reach are
// TrainerRows (moe_block.hpp).
#include <cstdint>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <moekit/core/config.hpp>
#include <moekit/core/error.hpp>
#include <moekit/experts/activation.hpp>

struct MoeFlags {
  std::string router = "softmax";      // score function
  std::string renormalize = "default";  // the gates renormalised over the top k (default: sigmoid yes, softmax no)
  double routed_scaling_factor = 1.0;
  bool router_bias = false;
  std::int64_t n_group = 0, topk_group = 0;  // 0: no groups; topk_group 0: 1
  std::string group_score = "top2_sum";
  std::string activation = "swiglu";
  double swiglu_alpha = moekit::act::SwigluOaiOptions{}.swiglu_alpha, swiglu_limit = moekit::act::SwigluOaiOptions{}.swiglu_limit;
  bool ffn_bias = false;
  std::int64_t shared_experts = 0, d_shared = 0;  // d_shared 0: d_expert
  bool shared_gate = false;
  std::string routing = "token_choice";  // or expert_choice (the experts pick their tokens)

  void add_to(CLI::App& app) {
    const std::string g = "Routers and experts of the open models";
    app.add_option("--router", router, "score function: softmax, or sigmoid (DeepSeek-V3)")
        ->check(CLI::IsMember({"softmax", "sigmoid"}))->group(g);
    app.add_option("--renormalize", renormalize, "gates renormalised over the top k: true, false, or default (sigmoid true, softmax false)")
        ->check(CLI::IsMember({"default", "true", "false"}))->group(g);
    app.add_option("--routed-scaling-factor", routed_scaling_factor, "multiplies the gates (DeepSeek-V3 2.5)")
        ->check(CLI::PositiveNumber)->group(g);
    app.add_flag("--router-bias", router_bias, "a trainable router bias, logits = W_r x + b (GPT-OSS)")->group(g);
    app.add_option("--n-group", n_group, "group-limited routing: experts in this many equal groups (DeepSeek-V2/V3; 0: off)")
        ->check(CLI::NonNegativeNumber)->group(g);
    app.add_option("--topk-group", topk_group, "groups kept per token (with --n-group; 0: 1)")->check(CLI::NonNegativeNumber)->group(g);
    app.add_option("--group-score", group_score, "a group's score: top2_sum (DeepSeek-V3) or max (DeepSeek-V2)")
        ->check(CLI::IsMember({"top2_sum", "max"}))->group(g);
    app.add_option("--activation", activation, "experts' activation: swiglu, or swiglu_oai (GPT-OSS's clamped SwiGLU)")
        ->check(CLI::IsMember({"swiglu", "swiglu_oai"}))->group(g);
    app.add_option("--swiglu-alpha", swiglu_alpha, "swiglu_oai: alpha of g * sigmoid(alpha g)")->check(CLI::PositiveNumber)->group(g);
    app.add_option("--swiglu-limit", swiglu_limit, "swiglu_oai: the clamp of the gate and up projections")
        ->check(CLI::PositiveNumber)->group(g);
    app.add_flag("--ffn-bias", ffn_bias, "biases on both expert projections (GPT-OSS)")->group(g);
    app.add_option("--shared-experts", shared_experts, "shared experts every token passes through (DeepSeek, Qwen2-MoE; 0: none)")
        ->check(CLI::NonNegativeNumber)->group(g);
    app.add_option("--d-shared", d_shared, "each shared expert's width (0: --d-expert)")->check(CLI::NonNegativeNumber)->group(g);
    app.add_flag("--shared-gate", shared_gate, "the shared experts' output times sigmoid(w x) (Qwen2-MoE)")->group(g);
    app.add_option("--routing", routing,
                   "token_choice, or expert_choice: each expert takes its capacity of the batch's tokens (softmax; needs "
                   "--capacity-factor > 0 and --lbl-coef 0; a token's experts then depend on the other tokens of the batch)")
        ->check(CLI::IsMember({"token_choice", "expert_choice"}))->group(g);
  }

  // The flags given values other than their defaults, by their config keys (a checkpoint's record; empty
  // for a run without them, so checkpoints written before these flags still resume).
  nlohmann::json changed() const {
    const MoeFlags d;
    nlohmann::json j = nlohmann::json::object();
    if (router != d.router) j["router"] = router;
    if (renormalize != d.renormalize) j["renormalize"] = renormalize;
    if (routed_scaling_factor != d.routed_scaling_factor) j["routed_scaling_factor"] = routed_scaling_factor;
    if (router_bias) j["router_bias"] = true;
    if (n_group != d.n_group) j["n_group"] = n_group;
    if (topk_group != d.topk_group) j["topk_group"] = topk_group;
    if (group_score != d.group_score) j["group_score"] = group_score;
    if (activation != d.activation) j["activation"] = activation;
    if (swiglu_alpha != d.swiglu_alpha) j["swiglu_alpha"] = swiglu_alpha;
    if (swiglu_limit != d.swiglu_limit) j["swiglu_limit"] = swiglu_limit;
    if (ffn_bias) j["ffn_bias"] = true;
    if (shared_experts != d.shared_experts) j["num_shared_experts"] = shared_experts;
    if (d_shared != d.d_shared) j["d_shared"] = d_shared;
    if (shared_gate) j["shared_gate"] = true;
    if (routing != d.routing) j["routing"] = routing;
    return j;
  }
  bool any() const { return !changed().empty(); }

  // Onto a layer config. An option is set only when its flag moved from the default, so a layer whose
  // policies lack it is not asked to take it (--swiglu-alpha without --activation swiglu_oai is the
  // layer's ConfigError, naming the key).
  void apply(moekit::MoeConfig& mc) const {
    const MoeFlags d;
    mc.router = moekit::parse_router(router);
    mc.activation = moekit::parse_activation(activation);
    if (renormalize != "default") mc.renormalize = renormalize == "true";
    if (routed_scaling_factor != d.routed_scaling_factor) mc.options.set("routed_scaling_factor", routed_scaling_factor);
    if (router_bias) mc.options.set("router_bias", true);
    if (n_group > 0) {
      mc.options.set("n_group", n_group);
      mc.options.set("topk_group", topk_group > 0 ? topk_group : std::int64_t(1));
      mc.options.set("group_score", group_score);
    } else if (topk_group != d.topk_group || group_score != d.group_score) {
      throw moekit::ConfigError(topk_group != d.topk_group ? "--topk-group" : "--group-score",
                                topk_group != d.topk_group ? std::to_string(topk_group) : group_score, "needs --n-group");
    }
    if (swiglu_alpha != d.swiglu_alpha) mc.options.set("swiglu_alpha", swiglu_alpha);
    if (swiglu_limit != d.swiglu_limit) mc.options.set("swiglu_limit", swiglu_limit);
    if (ffn_bias) mc.options.set("ffn_bias", true);
    if (shared_experts != d.shared_experts) mc.options.set("num_shared_experts", shared_experts);
    if (d_shared != d.d_shared) mc.options.set("d_shared", d_shared);
    if (shared_gate) mc.options.set("shared_gate", true);
    if (routing != d.routing) mc.options.set("routing", routing);
  }
};
