// plot_run: training metrics (JSON lines, one object per line) to PNG pictures, drawn by gnuplot.
//
//   plot_run [--out DIR] [--label NAME ...] metrics1.jsonl [metrics2.jsonl ...]
//
// DIR (default plots) receives one .gp script per picture, the data files they read (DIR/data/) and the
// PNGs; each PNG written is printed on stdout. The scripts use paths relative to DIR, so
// `cd DIR && gnuplot loss_steps.gp` redraws a picture after editing its script.
// Exit 0: done; 1: gnuplot failed on a script; 2: bad flags, unreadable input, a line that is not JSON, no gnuplot.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <sys/wait.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Something the user can fix (input, flags, environment): the message, then exit 2.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// gnuplot ran but did not draw: exit 1 (its own messages are on stderr above ours).
struct PlotError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using Table = std::vector<std::vector<double>>;

struct TrainRow {
  std::optional<double> elapsed, loss, bpb;
  std::vector<double> lbl;
  Table load;  // [layer][expert]: share of the layer's slots
};
struct EvalRow {
  std::optional<double> elapsed, loss, bpb;
};
struct RoutingRow {
  std::vector<std::string> domains;
  Table share;  // [domain][expert]
  std::size_t experts = 0;
};

struct Run {
  std::string label;  // legends
  std::string file;   // file names: label with only [A-Za-z0-9._-]
  fs::path path;
  // Keyed by step (routing: by layer): a resumed run's repeated rows overwrite the earlier ones, so the last
  // occurrence wins, and the rows come out in step order whatever order the file had them in.
  std::map<std::int64_t, TrainRow> train;
  std::map<std::int64_t, EvalRow> eval;
  std::map<std::int64_t, RoutingRow> routing;
};

// Typed access to one row's fields; a field of the wrong type is an error naming file:line and the field.
class Fields {
 public:
  Fields(const json& j, const std::string& where) : j_(j), where_(where) {}

  std::optional<double> number(const char* key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) fail(key, "a number");
    return v->get<double>();
  }
  std::optional<std::int64_t> integer(const char* key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_number_integer()) fail(key, "an integer");
    return v->get<std::int64_t>();
  }
  std::vector<double> numbers(const char* key) const {
    const json* v = find(key);
    if (!v) return {};
    if (!v->is_array()) fail(key, "an array of numbers");
    return to_numbers(*v, key);
  }
  Table table(const char* key) const {
    const json* v = find(key);
    if (!v) return {};
    if (!v->is_array()) fail(key, "an array of arrays of numbers");
    Table t;
    for (const json& row : *v) {
      if (!row.is_array()) fail(key, "an array of arrays of numbers");
      t.push_back(to_numbers(row, key));
    }
    return t;
  }
  std::vector<std::string> strings(const char* key) const {
    const json* v = find(key);
    if (!v) return {};
    std::vector<std::string> s;
    if (v->is_array())
      for (const json& e : *v) s.push_back(e.is_string() ? e.get<std::string>() : e.dump());
    else
      fail(key, "an array of strings");
    return s;
  }

 private:
  // null counts as absent: nlohmann writes a NaN (a diverged step's loss) as null.
  const json* find(const char* key) const {
    auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }
  std::vector<double> to_numbers(const json& a, const char* key) const {
    std::vector<double> out;
    for (const json& e : a) {
      if (e.is_null()) out.push_back(NAN);  // kept as a gap, so that later entries keep their index
      else if (e.is_number()) out.push_back(e.get<double>());
      else fail(key, "an array of numbers");
    }
    return out;
  }
  [[noreturn]] void fail(const char* key, const char* what) const {
    throw InputError(where_ + ": field \"" + key + "\" is not " + what);
  }
  const json& j_;
  const std::string& where_;
};

std::string file_safe(const std::string& label) {
  std::string s = label;
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != '_') c = '_';
  return s.empty() ? "run" : s;
}

Run read_run(const fs::path& path, const std::string& label) {
  Run run{label, file_safe(label), path, {}, {}, {}};
  if (fs::is_directory(path)) throw InputError(path.string() + ": is a folder, not a metrics file");
  std::ifstream in(path);
  if (!in) throw InputError(path.string() + ": cannot open (" + std::strerror(errno) + ")");
  std::string text;
  long line = 0;
  while (std::getline(in, text)) {
    ++line;
    const std::string where = path.string() + ":" + std::to_string(line);
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines, e.g. a trailing one
    json j;
    try {
      j = json::parse(text);
    } catch (const json::parse_error& e) {
      std::string why = e.what();
      if (auto p = why.find("] "); p != std::string::npos) why.erase(0, p + 2);  // drop "[json.exception...]"
      if (auto p = why.find("line 1, "); p != std::string::npos) why.erase(p, 8);  // we parse one line at a time
      throw InputError(where + ": not JSON (" + why + ")");
    }
    if (!j.is_object()) throw InputError(where + ": not a JSON object");
    const Fields f(j, where);
    const std::string type = j.value("type", std::string{});
    if (type == "train" || type == "eval") {
      const auto step = f.integer("step");
      if (!step) {
        std::cerr << "plot_run: note: " << where << ": " << type << " row without \"step\", skipped\n";
        continue;
      }
      if (type == "train")
        run.train[*step] = {f.number("elapsed_s"), f.number("loss"), f.number("bits_per_byte"), f.numbers("lbl"),
                            f.table("expert_load")};
      else
        run.eval[*step] = {f.number("elapsed_s"), f.number("heldout_loss"), f.number("heldout_bits_per_byte")};
    } else if (type == "routing") {
      const auto layer = f.integer("layer");
      if (!layer) {
        std::cerr << "plot_run: note: " << where << ": routing row without \"layer\", skipped\n";
        continue;
      }
      RoutingRow r{f.strings("domains"), f.table("share"), 0};
      for (const auto& d : r.share) r.experts = std::max(r.experts, d.size());
      if (auto e = f.integer("experts"); e && *e > 0) r.experts = std::max(r.experts, std::size_t(*e));
      run.routing[*layer] = std::move(r);
    }  // other types (config, final, ...) are not plotted
  }
  if (in.bad()) throw InputError(path.string() + ":" + std::to_string(line + 1) + ": read error");
  return run;
}

// A number for a data file; "?" marks a missing value (the scripts `set datafile missing '?'`).
std::string num(std::optional<double> v) {
  if (!v || !std::isfinite(*v)) return "?";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.10g", *v);
  return buf;
}

// Quoting for gnuplot single-quoted strings ('' is a quote) and for sh ('\'' is a quote).
std::string gq(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("''") : std::string(1, c);
  return q + "'";
}
std::string shq(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  if (!out.flush()) throw InputError(path.string() + ": cannot write");
}

// One heatmap cell per line: x y value x_lo x_hi, a blank line after each scan line (gnuplot's grid format).
struct Heat {
  std::string text;
  bool regular = true;  // an evenly spaced grid of at least 2 x 2 cells
};
// gnuplot's `with image` assumes an evenly spaced grid and would misplace cells on any other (a last step off
// the logging interval, one logged step), so those grids are drawn as boxes from their x_lo/x_hi columns.
std::string heat_plot(const std::string& data, bool regular) {
  if (regular) return gq(data) + " using 1:2:3 with image notitle";
  return gq(data) + " using 1:2:4:5:($2-0.5):($2+0.5):3 with boxxyerror fs solid 1.0 noborder fc palette notitle";
}

class Plotter {
 public:
  Plotter(fs::path out, std::string gnuplot) : out_(std::move(out)), gnuplot_(std::move(gnuplot)) {
    if (std::system((shq(gnuplot_) + " --version >/dev/null 2>&1 </dev/null").c_str()) != 0)
      throw InputError("gnuplot not found (ran '" + gnuplot_ + " --version'): install gnuplot-nox or pass --gnuplot");
    // pngcairo draws antialiased lines and text; libgd's png is the fallback that every gnuplot build has.
    for (const char* t : {"pngcairo", "png"})
      if (std::system((shq(gnuplot_) + " -e " + shq(std::string("set terminal ") + t) + " >/dev/null 2>&1 </dev/null").c_str()) == 0) {
        terminal_ = t;
        break;
      }
    if (terminal_.empty()) throw InputError("'" + gnuplot_ + "' has neither the pngcairo nor the png terminal");
    fs::create_directories(out_ / "data");
  }

  // data/<name>: a data file the scripts read; returns its path relative to DIR, as the scripts use it.
  std::string data(const std::string& name, const std::string& text) {
    write_file(out_ / "data" / name, text);
    return "data/" + name;
  }

  // Writes DIR/<name>.gp (common settings + body), runs gnuplot on it in DIR and prints DIR/<name>.png.
  void draw(const std::string& name, const std::string& body) {
    const std::string png = name + ".png";
    std::string gp = "# plot_run: cd to this folder and run gnuplot " + name + ".gp\n";
    gp += "set terminal " + terminal_ + " size 900,540 noenhanced\n";  // noenhanced: '_' in labels is not a subscript
    gp += "set output " + gq(png) + "\nset datafile missing '?'\nset grid\n" + body;
    write_file(out_ / (name + ".gp"), gp);
    fs::remove(out_ / png);  // so that a stale picture cannot pass for a new one
    const int rc = std::system(("cd " + shq(out_.string()) + " && " + shq(gnuplot_) + " " + shq(name + ".gp") + " </dev/null").c_str());
    std::error_code ec;
    if (rc != 0 || fs::file_size(out_ / png, ec) == 0 || ec)
      throw PlotError("gnuplot failed on " + (out_ / (name + ".gp")).string() +
                      (WIFEXITED(rc) ? " (exit " + std::to_string(WEXITSTATUS(rc)) + ")" : std::string()));
    std::cout << (out_ / png).string() << "\n" << std::flush;
  }

 private:
  fs::path out_;
  std::string gnuplot_, terminal_;
};

// Per run: data/<file>_train.dat (step elapsed_s loss bits_per_byte lbl_0 ...) and data/<file>_eval.dat
// (step elapsed_s heldout_loss heldout_bits_per_byte): the same four first columns, so one column number
// picks the unit in both.
struct RunData {
  std::string train, eval;
  std::size_t layers = 0;  // lbl columns
};

RunData write_run_data(Plotter& p, const Run& run) {
  RunData d;
  if (!run.train.empty()) {
    for (const auto& [step, r] : run.train) d.layers = std::max(d.layers, r.lbl.size());
    std::string t = "# step elapsed_s loss bits_per_byte";
    for (std::size_t l = 0; l < d.layers; ++l) t += " lbl_" + std::to_string(l);
    t += "\n";
    for (const auto& [step, r] : run.train) {
      t += std::to_string(step) + " " + num(r.elapsed) + " " + num(r.loss) + " " + num(r.bpb);
      for (std::size_t l = 0; l < d.layers; ++l) (t += ' ') += num(l < r.lbl.size() ? std::optional(r.lbl[l]) : std::nullopt);
      t += "\n";
    }
    d.train = p.data(run.file + "_train.dat", t);
  }
  if (!run.eval.empty()) {
    std::string t = "# step elapsed_s heldout_loss heldout_bits_per_byte\n";
    for (const auto& [step, r] : run.eval)
      t += std::to_string(step) + " " + num(r.elapsed) + " " + num(r.loss) + " " + num(r.bpb) + "\n";
    d.eval = p.data(run.file + "_eval.dat", t);
  }
  return d;
}

template <class Rows, class Pred>
bool any_row(const Rows& rows, Pred pred) {
  return std::any_of(rows.begin(), rows.end(), [&](const auto& kv) { return pred(kv.second); });
}

// loss_steps / loss_time: training loss (lines) and held-out loss (dashed, points), one colour per run.
void draw_loss(Plotter& p, const std::vector<Run>& runs, const std::vector<RunData>& data, bool by_time, bool bpb) {
  const int ycol = bpb ? 4 : 3, xcol = by_time ? 2 : 1;
  const auto has = [&](const auto& r) { return (bpb ? r.bpb : r.loss) && (!by_time || r.elapsed); };
  std::vector<std::string> clauses;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Run& run = runs[i];
    if (by_time && !any_row(run.train, [](const auto& r) { return bool(r.elapsed); }) &&
        !any_row(run.eval, [](const auto& r) { return bool(r.elapsed); })) {
      std::cerr << "plot_run: note: " << run.path.string() << " has no elapsed_s; left out of loss_time.png\n";
      continue;
    }
    const std::string using_ = " using " + std::to_string(xcol) + ":" + std::to_string(ycol);
    const std::string lc = " lc " + std::to_string(i + 1);
    if (any_row(run.train, has))
      clauses.push_back(gq(data[i].train) + using_ + " with lines lw 2" + lc + " title " + gq(run.label + " train"));
    if (any_row(run.eval, has))
      clauses.push_back(gq(data[i].eval) + using_ + " with linespoints dt 2 pt 7 ps 0.8 lw 2" + lc + " title " +
                        gq(run.label + " held-out"));
  }
  const std::string name = by_time ? "loss_time" : "loss_steps";
  if (clauses.empty()) {
    std::cerr << "plot_run: note: nothing to draw in " << name << ".png\n";
    return;
  }
  std::string body = "set title " + gq(std::string("training and held-out loss against ") + (by_time ? "wall time" : "step")) + "\n";
  body += "set xlabel " + gq(by_time ? "elapsed time (s)" : "step") + "\n";
  body += "set ylabel " + gq(bpb ? "bits per byte" : "loss (nats)") + "\nset key top right\nplot ";
  for (std::size_t c = 0; c < clauses.size(); ++c) body += (c ? ", \\\n     " : "") + clauses[c];
  p.draw(name, body + "\n");
}

// lbl.png: the load-balancing loss of each layer against step; colour: run, dash pattern: layer.
void draw_lbl(Plotter& p, const std::vector<Run>& runs, const std::vector<RunData>& data) {
  std::vector<std::string> clauses;
  for (std::size_t i = 0; i < runs.size(); ++i)
    for (std::size_t l = 0; l < data[i].layers; ++l) {
      if (!any_row(runs[i].train, [&](const TrainRow& r) { return l < r.lbl.size() && std::isfinite(r.lbl[l]); })) continue;
      clauses.push_back(gq(data[i].train) + " using 1:" + std::to_string(5 + l) + " with lines lw 2 lc " +
                        std::to_string(i + 1) + " dt " + std::to_string(l % 5 + 1) + " title " +
                        gq(runs[i].label + " layer " + std::to_string(l)));
    }
  if (clauses.empty()) return;  // no MoE layers in any run: no picture, nothing to note
  std::string body = "set title 'load-balancing loss per layer'\nset xlabel 'step'\nset ylabel 'load-balancing loss'\n";
  body += "set key top right\nplot ";
  for (std::size_t c = 0; c < clauses.size(); ++c) body += (c ? ", \\\n     " : "") + clauses[c];
  p.draw("lbl", body + "\n");
}

// White to red: the values printed on the routing table stay readable in black on every cell.
const char* const kPalette = "set palette defined (0 '#ffffff', 0.5 '#fdae61', 1 '#d7301f')\nset cbrange [0:*]\n";

// expert_load_<file>_layer<l>.png: x = step, y = expert, colour = the expert's share of the layer's slots.
void draw_expert_load(Plotter& p, const Run& run) {
  std::size_t layers = 0;
  for (const auto& [step, r] : run.train) layers = std::max(layers, r.load.size());
  for (std::size_t l = 0; l < layers; ++l) {
    std::vector<std::pair<std::int64_t, const std::vector<double>*>> cols;
    std::size_t experts = 0;
    for (const auto& [step, r] : run.train)
      if (l < r.load.size() && !r.load[l].empty()) {
        cols.emplace_back(step, &r.load[l]);
        experts = std::max(experts, r.load[l].size());
      }
    if (cols.empty()) continue;
    Heat h;
    h.regular = cols.size() >= 2 && experts >= 2;
    double x_min = 0, x_max = 0;
    for (std::size_t c = 0; c < cols.size(); ++c) {
      // The cell spans halfway to each neighbouring step (one step's width for a lone column).
      const double s = double(cols[c].first);
      const double lo = c > 0 ? (s + double(cols[c - 1].first)) / 2 : cols.size() > 1 ? s - (double(cols[1].first) - s) / 2 : s - 0.5;
      const double hi = c + 1 < cols.size() ? (s + double(cols[c + 1].first)) / 2 : c > 0 ? s + (s - double(cols[c - 1].first)) / 2 : s + 0.5;
      if (c == 0) x_min = lo;
      x_max = hi;
      if (c >= 2 && cols[c].first - cols[c - 1].first != cols[1].first - cols[0].first) h.regular = false;
      if (cols[c].second->size() != experts) h.regular = false;
      for (std::size_t e = 0; e < experts; ++e) {
        const auto& v = *cols[c].second;
        h.text += num(s) + " " + std::to_string(e) + " " + num(e < v.size() ? std::optional(v[e]) : std::nullopt) + " " +
                  num(lo) + " " + num(hi) + "\n";
      }
      h.text += "\n";
    }
    const std::string name = "expert_load_" + run.file + "_layer" + std::to_string(l);
    const std::string file = p.data(run.file + "_load_layer" + std::to_string(l) + ".dat", h.text);
    std::string body = "set title " + gq("expert load: " + run.label + ", layer " + std::to_string(l)) + "\n";
    body += "set xlabel 'step'\nset ylabel 'expert'\nset cblabel 'share of slots'\nset colorbox\n";
    body += std::string(kPalette) + "set grid noxtics noytics\nset yrange [-0.5:" + num(double(experts) - 0.5) + "]\n";
    if (experts <= 16) body += "set ytics 1\n";
    body += "set xrange [" + num(x_min) + ":" + num(x_max) + "]\n";
    p.draw(name, body + "plot " + heat_plot(file, h.regular) + "\n");
  }
}

// routing_<file>_layer<l>.png: the final domain x expert table, the share printed in each cell.
void draw_routing(Plotter& p, const Run& run) {
  for (const auto& [layer, r] : run.routing) {
    if (r.share.empty() || r.experts == 0) continue;
    Heat h;
    h.regular = r.share.size() >= 2 && r.experts >= 2;
    for (std::size_t d = 0; d < r.share.size(); ++d) {
      if (r.share[d].size() != r.experts) h.regular = false;
      for (std::size_t e = 0; e < r.experts; ++e)
        h.text += std::to_string(e) + " " + std::to_string(d) + " " +
                  num(e < r.share[d].size() ? std::optional(r.share[d][e]) : std::nullopt) + " " + num(e - 0.5) + " " +
                  num(e + 0.5) + "\n";
      h.text += "\n";
    }
    const std::string l = std::to_string(layer);
    const std::string file = p.data(run.file + "_routing_layer" + l + ".dat", h.text);
    std::string body = "set title " + gq("routing: " + run.label + ", layer " + l + " (share of each domain's slots per expert)") + "\n";
    body += "set xlabel 'expert'\nset ylabel 'domain'\nset cblabel 'share of the domain''s slots'\nset colorbox\n";
    body += std::string(kPalette) + "set grid noxtics noytics\n";
    // Domain 0 on top, read like the table it is.
    body += "set xrange [-0.5:" + num(double(r.experts) - 0.5) + "]\nset yrange [" + num(double(r.share.size()) - 0.5) + ":-0.5]\n";
    if (r.experts <= 32) body += "set xtics 1\n";
    body += "set ytics (";
    for (std::size_t d = 0; d < r.share.size(); ++d)
      body += (d ? ", " : "") + gq(d < r.domains.size() ? r.domains[d] : "domain " + std::to_string(d)) + " " + std::to_string(d);
    body += ")\n";
    const std::string font = r.experts > 16 ? "',7'" : "',9'";
    p.draw("routing_" + run.file + "_layer" + l,
           body + "plot " + heat_plot(file, h.regular) + ", \\\n     " + gq(file) +
               " using 1:2:(sprintf('%.2f', $3)) with labels font " + font + " notitle\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"plot_run: training metrics (JSON lines) to PNG pictures, drawn by gnuplot"};
  std::string out = "plots", gnuplot = "gnuplot";
  std::vector<std::string> labels, files;
  app.add_option("--out", out, "folder for the PNGs, their .gp scripts and data/ (created)")->capture_default_str();
  // allow_extra_args(false): each --label takes one name, so the metrics files after it stay positional.
  app.add_option("--label", labels, "a run's name in legends and file names; once per metrics file, in order (default: the file's stem)")
      ->allow_extra_args(false);
  app.add_option("--gnuplot", gnuplot, "the gnuplot command")->capture_default_str();
  app.add_option("metrics", files, "metrics files, one JSON object per line")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);  // prints the message
    return 2;
  }
  try {
    if (!labels.empty() && labels.size() != files.size())
      throw InputError(std::to_string(labels.size()) + " --label for " + std::to_string(files.size()) +
                       " metrics files: give one per file, or none");
    std::vector<Run> runs;
    std::set<std::string> names;
    for (std::size_t i = 0; i < files.size(); ++i) {
      runs.push_back(read_run(files[i], labels.empty() ? fs::path(files[i]).stem().string() : labels[i]));
      if (!names.insert(runs.back().file).second)
        throw InputError("two runs would share the file name '" + runs.back().file + "' (" + files[i] +
                         "): give each a distinct --label");
    }
    Plotter p(out, gnuplot);
    std::vector<RunData> data;
    for (const Run& run : runs) data.push_back(write_run_data(p, run));
    // One unit for the loss pictures: bits per byte only when every run that logs a loss logs it too.
    bool any_bpb = false, all_bpb = true;
    for (const Run& run : runs) {
      const auto bpb = [](const auto& r) { return bool(r.bpb); };
      const auto nats = [](const auto& r) { return bool(r.loss); };
      any_bpb = any_bpb || any_row(run.train, bpb) || any_row(run.eval, bpb);
      if ((any_row(run.train, nats) && !any_row(run.train, bpb)) || (any_row(run.eval, nats) && !any_row(run.eval, bpb)))
        all_bpb = false;
    }
    if (any_bpb && !all_bpb) std::cerr << "plot_run: note: not every run logs bits per byte; the loss pictures show nats\n";
    draw_loss(p, runs, data, false, any_bpb && all_bpb);
    draw_loss(p, runs, data, true, any_bpb && all_bpb);
    draw_lbl(p, runs, data);
    for (const Run& run : runs) draw_expert_load(p, run);
    for (const Run& run : runs) draw_routing(p, run);
  } catch (const InputError& e) {
    std::cerr << "plot_run: error: " << e.what() << "\n";
    return 2;
  } catch (const PlotError& e) {
    std::cerr << "plot_run: error: " << e.what() << "\n";
    return 1;
  } catch (const fs::filesystem_error& e) {
    std::cerr << "plot_run: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
