// moekit-plan: the compute-optimal fine-grained MoE for a FLOP budget, and the scaling-law fit it rests
// on (Krajewski et al., arXiv 2402.07871; science/scaling_law.hpp, planner.hpp, fit.hpp; docs/science.md).
//
//   moekit-plan --flops 1e21 [--experts 64] [--coefficients paper|FILE.json] [--max-granularity 64] [--json]
//   moekit-plan --fit runs.jsonl [--experts 64] --out coefficients.json
//
// The first prints, for each granularity G = 1, 2, 4, ..., the depth, width, parameters, tokens and
// predicted loss of the best model the budget buys, then the best G, the runner-up and the FLOPs a
// dense model would need for the same loss. The second fits the law's seven coefficients to measured
// runs, one JSON object a line: {"total_params": N, "tokens": D, "granularity": G, "loss": L} (other
// keys are ignored), and writes them as a coefficients file the first form reads.
// Bad input (a budget that is not a positive number, an unknown coefficient key, a runs file with too
// few points or values that are not positive and finite) exits 2 with a message.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <moekit/science/fit.hpp>
#include <moekit/science/planner.hpp>

namespace sc = moekit::science;
using nlohmann::ordered_json;

namespace {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The law's coefficients by name, in file order.
const std::vector<std::pair<const char*, double sc::ScalingLaw::*>>& coefficient_names() {
  static const std::vector<std::pair<const char*, double sc::ScalingLaw::*>> k = {
      {"a", &sc::ScalingLaw::a}, {"alpha", &sc::ScalingLaw::alpha}, {"b", &sc::ScalingLaw::b}, {"beta", &sc::ScalingLaw::beta},
      {"g", &sc::ScalingLaw::g}, {"gamma", &sc::ScalingLaw::gamma}, {"c", &sc::ScalingLaw::c}};
  return k;
}

struct Coefficients {
  sc::ScalingLaw moe, dense;
  std::string label, dense_label;
};

// Reads a, alpha, b, beta, g, gamma, c from `j` into `law` (all required; g and gamma may be absent when
// `dense`); any other key but those in `also` is an error.
void read_law(const ordered_json& j, const std::string& where, bool dense, const std::vector<std::string>& also, sc::ScalingLaw& law) {
  if (!j.is_object()) throw InputError(where + ": must be a JSON object of coefficients");
  for (auto it = j.begin(); it != j.end(); ++it) {
    bool known = std::find(also.begin(), also.end(), it.key()) != also.end();
    for (const auto& [name, member] : coefficient_names())
      if (it.key() == name) {
        if (!it.value().is_number()) throw InputError(where + ": coefficient '" + it.key() + "' must be a number");
        law.*member = it.value().get<double>(), known = true;
      }
    if (!known)
      throw InputError(where + ": unknown coefficient key '" + it.key() + "' (the keys are a, alpha, b, beta, g, gamma, c" +
                       (also.empty() ? std::string(")") : "; also experts, fit, dense)"));
  }
  for (const auto& [name, member] : coefficient_names()) {
    const bool optional = dense && (std::string(name) == "g" || std::string(name) == "gamma");
    if (optional && !j.contains(name)) law.*member = 0;
    else if (!j.contains(name)) throw InputError(where + ": coefficient '" + std::string(name) + "' is missing");
  }
  law.check();
}

// "paper" (the MoE and the dense fits of the paper's Table 1), or a JSON object with every coefficient,
// and optionally "experts", "fit" (written by --fit) and "dense" (a dense law: a, alpha, b, beta, c).
Coefficients read_coefficients(const std::string& source) {
  if (source == "paper")
    return {sc::ScalingLaw::paper(), sc::ScalingLaw::paper_dense(), "paper (Krajewski et al. 2024, Eq. 9, fitted at E = 64)",
            "the paper's dense fit (a 16.3, alpha 0.126, b 26.7, beta 0.127, c 0.47)"};
  std::ifstream in(source);
  if (!in) throw InputError(source + ": cannot open (--coefficients takes 'paper' or a JSON file)");
  ordered_json j;
  try {
    j = ordered_json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(source + ": not JSON (" + std::string(e.what()) + ")");
  }
  Coefficients c;
  read_law(j, source, false, {"experts", "fit", "dense"}, c.moe);
  c.label = source;
  if (j.contains("dense")) {
    read_law(j["dense"], source + ": dense", true, {}, c.dense);
    c.dense_label = source + "'s dense coefficients";
  } else {
    c.dense = c.moe.without_granularity();
    c.dense_label = source + "'s law without its G term (the file has no \"dense\" coefficients)";
  }
  return c;
}

std::vector<sc::Run> read_runs(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError(path + ": cannot open");
  std::vector<sc::Run> runs;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(n);
    ordered_json j;
    try {
      j = ordered_json::parse(line);
    } catch (const nlohmann::json::exception& e) {  // a parse error, or a number beyond double (1e999)
      throw InputError(where + ": not JSON, or a number that is not finite (" + std::string(e.what()) + ")");
    }
    sc::Run r;
    const std::pair<const char*, double*> fields[] = {
        {"total_params", &r.total_params}, {"tokens", &r.tokens}, {"granularity", &r.granularity}, {"loss", &r.loss}};
    for (const auto& [key, dst] : fields) {
      if (!j.is_object() || !j.contains(key)) throw InputError(where + ": '" + key + "' is missing");
      if (!j[key].is_number()) throw InputError(where + ": '" + key + "' must be a number");
      *dst = j[key].get<double>();
      if (!std::isfinite(*dst) || !(*dst > 0)) throw InputError(where + ": '" + key + "' = " + j[key].dump() + " must be finite and > 0");
    }
    runs.push_back(r);
  }
  return runs;
}

void print_plan(const sc::Plan& p, const Coefficients& k) {
  std::printf("moekit-plan: %.3g FLOPs, E = %g experts, coefficients: %s\n\n", p.flops, p.experts, k.label.c_str());
  std::printf("%5s %9s %9s %14s %14s %12s %9s\n", "G", "n_blocks", "d_model", "total params", "active params", "tokens D", "loss");
  for (std::size_t i = 0; i < p.points.size(); ++i) {
    const sc::PlanPoint& q = p.points[i];
    std::printf("%5g %9.2f %9.1f %14.4g %14.4g %12.4g %9.5f%s%s\n", q.granularity, q.shape.n_blocks, q.shape.d_model, q.shape.total_params,
                q.shape.active_params, q.tokens, q.loss, i == p.best ? "  <- best" : "", q.at_bound ? "  (at the depth limit)" : "");
  }
  const sc::PlanPoint& b = p.optimum();
  const sc::PlanPoint& r = p.points[p.runner_up];
  std::printf("\nbest G = %g: %.1f blocks of d_model %.0f, %.4g total and %.4g active parameters, %.4g tokens, loss %.5f\n",
              b.granularity, b.shape.n_blocks, b.shape.d_model, b.shape.total_params, b.shape.active_params, b.tokens, b.loss);
  std::printf("runner-up G = %g: loss %.5f (+%.5f)\n", r.granularity, r.loss, r.loss - b.loss);
  std::printf("a compute-optimal dense model needs %.4g FLOPs for loss %.5f: %.2fx this budget (dense law: %s)\n",
              p.dense_flops_for_same_loss, b.loss, p.dense_flops_for_same_loss / p.flops, k.dense_label.c_str());
}

ordered_json plan_json(const sc::Plan& p) {
  const sc::PlanPoint& b = p.optimum();
  ordered_json j = {{"total_params", b.shape.total_params},
                    {"active_params", b.shape.active_params},
                    {"n_blocks", b.shape.n_blocks},
                    {"d_model", b.shape.d_model},
                    {"tokens", b.tokens},
                    {"granularity", b.granularity},
                    {"loss", b.loss},
                    {"runner_up_granularity", p.points[p.runner_up].granularity},
                    {"runner_up_loss", p.points[p.runner_up].loss},
                    {"dense_flops_for_same_loss", p.dense_flops_for_same_loss},
                    {"flops", p.flops},
                    {"experts", p.experts}};
  j["per_granularity"] = ordered_json::array();
  for (const sc::PlanPoint& q : p.points)
    j["per_granularity"].push_back({{"granularity", q.granularity},
                                    {"n_blocks", q.shape.n_blocks},
                                    {"d_model", q.shape.d_model},
                                    {"total_params", q.shape.total_params},
                                    {"active_params", q.shape.active_params},
                                    {"tokens", q.tokens},
                                    {"loss", q.loss},
                                    {"at_bound", q.at_bound}});
  return j;
}

int fit(const std::string& runs_path, double experts, const std::string& out) {
  const std::vector<sc::Run> runs = read_runs(runs_path);
  const sc::FitResult r = sc::fit_scaling_law(runs);
  ordered_json j;
  for (const auto& [name, member] : coefficient_names()) j[name] = r.law.*member;
  j["experts"] = experts;
  j["fit"] = {{"runs", runs.size()},       {"file", runs_path},  {"dense_form", r.dense},  {"huber_delta", 0.1},
              {"objective", r.objective}, {"rms_log_residual", r.rms_log_residual}, {"initial_points", r.starts}};
  std::ofstream f(out);
  if (!f || !(f << j.dump(2) << "\n")) throw InputError(out + ": cannot write");
  const sc::ScalingLaw paper = sc::ScalingLaw::paper();
  std::printf("moekit-plan --fit: %zu runs from %s (%s form), rms log residual %.4g\n\n%-6s %12s %12s\n", runs.size(), runs_path.c_str(),
              r.dense ? "dense: one granularity" : "Eq. 9", r.rms_log_residual, "", "fitted", "paper");
  for (const auto& [name, member] : coefficient_names()) std::printf("%-6s %12.5g %12.5g\n", name, r.law.*member, paper.*member);
  std::printf("\nwritten to %s\n", out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moekit-plan: compute-optimal fine-grained MoE (Krajewski et al. 2024) for a FLOP budget; fit the law to runs"};
  app.option_defaults()->always_capture_default();
  double flops = 0, experts = 64;
  std::string coefficients = "paper", runs, out;
  std::int64_t max_granularity = 64;
  bool json = false;
  auto* f_opt = app.add_option("--flops", flops, "training budget in FLOPs (Eq. 10)");
  auto* r_opt = app.add_option("--fit", runs, "fit the coefficients to these runs (JSON lines: total_params, tokens, granularity, loss)");
  f_opt->excludes(r_opt);
  app.add_option("--experts", experts, "E, the expansion rate: E full-size FFNs split G ways (the paper fits E = 64)");
  app.add_option("--coefficients", coefficients, "'paper' or a JSON file (as --fit --out writes)");
  app.add_option("--max-granularity", max_granularity, "G runs over 1, 2, 4, ... up to this");
  app.add_flag("--json", json, "print one JSON object instead of the table");
  app.add_option("--out", out, "--fit: where to write the coefficients (JSON)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  try {
    if (f_opt->count() == 0 && r_opt->count() == 0) throw InputError("give --flops BUDGET (plan) or --fit RUNS.jsonl (fit); see --help");
    if (!std::isfinite(experts) || !(experts >= 1)) throw InputError("--experts = " + std::to_string(experts) + " must be >= 1");
    if (r_opt->count()) {
      if (out.empty()) throw InputError("--fit needs --out FILE.json for the coefficients");
      return fit(runs, experts, out);
    }
    if (!std::isfinite(flops) || !(flops > 0)) throw InputError("--flops = " + std::to_string(flops) + " must be a positive, finite FLOP count");
    if (max_granularity < 1) throw InputError("--max-granularity = " + std::to_string(max_granularity) + " must be >= 1");
    const Coefficients k = read_coefficients(coefficients);
    sc::PlanOptions o;
    o.max_granularity = max_granularity;
    const sc::Plan p = sc::plan(k.moe, flops, experts, o, k.dense);
    if (json) std::printf("%s\n", plan_json(p).dump(2).c_str());
    else print_plan(p, k);
    return 0;
  } catch (const InputError& e) {
    std::fprintf(stderr, "moekit-plan: error: %s\n", e.what());
    return 2;
  } catch (const moekit::ConfigError& e) {
    std::fprintf(stderr, "moekit-plan: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moekit-plan: error: %s\n", e.what());
    return 1;
  }
}
