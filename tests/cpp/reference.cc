// fp64 reference of divkit's token-level divergences. See reference.h.
//
// Every entry is handled from its log-probabilities lp = log p_j and lq = log q_j; an entry is
// masked (probability exactly 0) when its log-probability is -inf. Products such as p * log p
// are taken as 0 when the factor in front is masked, and as +inf when the log inside belongs to
// a masked entry while the factor is not (an infinite divergence). Quantities such as
// p^2 / q or p^a q^(1-a) are evaluated as exp of a sum of logs, so that probabilities that
// underflow in double (logits of +-1e4) still give the right finite terms.
//
// For L = sum_j g(p_j, q_j) the chain rule through q = softmax(s / T) gives
//   dL/ds_j = (1/T) (q_j a_j - q_j sum_i q_i a_i),  a_j = dg/dq_j,
// and likewise for the teacher with b_j = dg/dp_j. The products qa_j = q_j a_j and
// pb_j = p_j b_j are written in closed form per kind so that masked entries give 0, not 0 * inf.
#include "reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace divkit_ref {

namespace {

using divkit::DivergenceKind;
using divkit::Reduction;

constexpr double kInf = std::numeric_limits<double>::infinity();

double log_or_ninf(double x) { return x > 0.0 ? std::log(x) : -kInf; }

double log_add_exp(double a, double b) {
  if (a == -kInf) return b;
  if (b == -kInf) return a;
  const double m = std::max(a, b);
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

// log softmax(x / T) in double; masked (-inf) entries stay -inf.
void log_softmax(const double* x, int64_t v, double temperature, std::vector<double>& out) {
  out.resize(static_cast<size_t>(v));
  double mx = -kInf;
  for (int64_t j = 0; j < v; ++j) mx = std::max(mx, x[j] / temperature);
  if (mx == -kInf) {
    std::fill(out.begin(), out.end(), std::numeric_limits<double>::quiet_NaN());
    return;
  }
  double sum = 0.0;
  for (int64_t j = 0; j < v; ++j) sum += std::exp(x[j] / temperature - mx);
  const double log_sum = std::log(sum);
  for (int64_t j = 0; j < v; ++j) out[j] = (x[j] / temperature - mx) - log_sum;
}

// The kind actually computed once the documented limits are taken.
DivergenceKind effective_kind(const Params& prm) {
  switch (prm.kind) {
    case DivergenceKind::jsd:
      if (prm.beta == 0.0) return DivergenceKind::forward_kl;
      if (prm.beta == 1.0) return DivergenceKind::reverse_kl;
      return prm.kind;
    case DivergenceKind::alpha_divergence:
      if (prm.alpha == 1.0) return DivergenceKind::forward_kl;
      if (prm.alpha == 0.0) return DivergenceKind::reverse_kl;
      return prm.kind;
    case DivergenceKind::renyi:
      if (prm.alpha == 1.0) return DivergenceKind::forward_kl;
      return prm.kind;
    case DivergenceKind::skew_forward_kl:  // m = q: KL(p || q)
      return prm.alpha == 0.0 ? DivergenceKind::forward_kl : prm.kind;
    case DivergenceKind::skew_reverse_kl:  // m = p: KL(q || p)
      return prm.alpha == 0.0 ? DivergenceKind::reverse_kl : prm.kind;
    default: return prm.kind;
  }
}

// One entry's value term g and the products qa = q dg/dq, pb = p dg/dp.
struct Term {
  double g = 0.0;
  double qa = 0.0;
  double pb = 0.0;
  bool tie = false;  // tvd: p == q to within fp32 accuracy, where the gradient jumps
};

// sum_j p (lp - lq) style term: 0 when x is masked, +inf when y is masked and x is not.
double x_log_ratio(double lx, double ly) {
  if (lx == -kInf) return 0.0;
  if (ly == -kInf) return kInf;
  return std::exp(lx) * (lx - ly);
}

Term forward_kl_term(double lp, double lq) {
  Term r;
  const double p = std::exp(lp);
  r.g = x_log_ratio(lp, lq);
  r.qa = -p;
  r.pb = lp == -kInf ? 0.0 : (lq == -kInf ? kInf : p * (lp - lq + 1.0));
  return r;
}

Term reverse_kl_term(double lp, double lq) {
  Term r;
  const double q = std::exp(lq);
  r.g = x_log_ratio(lq, lp);
  r.qa = lq == -kInf ? 0.0 : (lp == -kInf ? kInf : q * (lq - lp + 1.0));
  r.pb = -q;
  return r;
}

Term entry_term(DivergenceKind kind, const Params& prm, double lp, double lq) {
  const bool mp = lp == -kInf;
  const bool mq = lq == -kInf;
  const double p = std::exp(lp);
  const double q = std::exp(lq);
  Term r;
  switch (kind) {
    case DivergenceKind::forward_kl: return forward_kl_term(lp, lq);
    case DivergenceKind::reverse_kl: return reverse_kl_term(lp, lq);
    case DivergenceKind::cross_entropy:
      r.g = mp ? 0.0 : (mq ? kInf : -p * lq);
      r.qa = -p;
      r.pb = r.g;
      return r;
    case DivergenceKind::jsd: {
      const double b = prm.beta;
      const double lm = log_add_exp(std::log(b) + lp, std::log1p(-b) + lq);
      const double kp = mp ? 0.0 : p * (lp - lm);
      const double kq = mq ? 0.0 : q * (lq - lm);
      r.g = b * kp + (1.0 - b) * kq;
      r.qa = (1.0 - b) * kq;
      r.pb = b * kp;
      return r;
    }
    case DivergenceKind::skew_forward_kl: {
      // g = p (lp - lr), r = a p + (1 - a) q
      const double a = prm.alpha;
      const double lr = log_add_exp(log_or_ninf(a) + lp, log_or_ninf(1.0 - a) + lq);
      if (mp) return r;
      if (lr == -kInf) {
        r.g = kInf;
        return r;
      }
      r.g = p * (lp - lr);
      r.qa = mq ? 0.0 : -(1.0 - a) * std::exp(lp + lq - lr);
      r.pb = p * (lp - lr + 1.0) - a * std::exp(2.0 * lp - lr);
      return r;
    }
    case DivergenceKind::skew_reverse_kl: {
      // g = q (lq - lr), r = (1 - a) p + a q
      const double a = prm.alpha;
      const double lr = log_add_exp(log_or_ninf(1.0 - a) + lp, log_or_ninf(a) + lq);
      if (mq) return r;
      if (lr == -kInf) {
        r.g = kInf;
        return r;
      }
      r.g = q * (lq - lr);
      r.qa = q * (lq - lr + 1.0) - a * std::exp(2.0 * lq - lr);
      r.pb = mp ? 0.0 : -(1.0 - a) * std::exp(lp + lq - lr);
      return r;
    }
    case DivergenceKind::tvd: {
      const double d = p - q;
      const double sg = d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : 0.0);
      r.g = 0.5 * std::fabs(d);
      r.qa = -0.5 * q * sg;
      r.pb = 0.5 * p * sg;
      r.tie = !mp && !mq && std::fabs(lp - lq) < 1e-3;  // refined in row()
      return r;
    }
    case DivergenceKind::hellinger: {
      const double sp = mp ? 0.0 : std::exp(0.5 * lp);
      const double sq = mq ? 0.0 : std::exp(0.5 * lq);
      const double h = sp * sq;
      r.g = (sp - sq) * (sp - sq);
      r.qa = q - h;
      r.pb = p - h;
      return r;
    }
    case DivergenceKind::jeffreys: {
      const Term f = forward_kl_term(lp, lq);
      const Term b = reverse_kl_term(lp, lq);
      r.g = f.g + b.g;
      r.qa = f.qa + b.qa;
      r.pb = f.pb + b.pb;
      return r;
    }
    case DivergenceKind::chi2: {
      // (p - q)^2 / q = q (p/q - 1)^2
      if (mq) {
        r.g = mp ? 0.0 : kInf;
        return r;
      }
      const double p2q = mp ? 0.0 : std::exp(2.0 * lp - lq);
      if (!mp && lp - lq > 1.0) {
        r.g = p2q - 2.0 * p + q;  // no cancellation: p^2/q > e p; stays right when q underflows
      } else {
        const double em = mp ? -1.0 : std::expm1(lp - lq);
        r.g = q * em * em;
      }
      r.qa = q - p2q;
      r.pb = 2.0 * p2q - 2.0 * p;
      return r;
    }
    case DivergenceKind::alpha_divergence: {
      const double a = prm.alpha;
      double u;
      if (mp && mq) {
        u = 0.0;
      } else if (mp) {
        u = a > 0.0 ? 0.0 : kInf;
      } else if (mq) {
        u = a < 1.0 ? 0.0 : kInf;
      } else {
        u = std::exp(a * lp + (1.0 - a) * lq);
      }
      if (u == kInf) {
        r.g = kInf;
        return r;
      }
      r.g = (a * p + (1.0 - a) * q - u) / (a * (1.0 - a));
      r.qa = (q - u) / a;
      r.pb = (p - u) / (1.0 - a);
      return r;
    }
    default: throw std::logic_error("reference: entry_term called for an unsupported kind");
  }
}

}  // namespace

Params params_from_spec(const divkit::DivergenceSpec& spec) {
  Params prm;
  prm.kind = spec.kind;
  prm.beta = static_cast<double>(spec.beta);
  prm.alpha = static_cast<double>(spec.alpha);
  prm.temperature = static_cast<double>(spec.temperature);
  prm.scale_by_t_squared = spec.scale_by_t_squared;
  return prm;
}

RowResult row(const double* s, const double* t, int64_t v, const Params& prm, bool want_grads) {
  const double temp = prm.temperature;
  std::vector<double> lq, lp;
  log_softmax(s, v, temp, lq);
  log_softmax(t, v, temp, lp);
  const size_t n = static_cast<size_t>(v);
  std::vector<double> qa(n), pb(n);
  std::vector<char> tie(n, 0);
  RowResult out;
  const DivergenceKind kind = effective_kind(prm);

  if (kind == DivergenceKind::renyi) {
    const double a = prm.alpha;
    std::vector<double> lu(n);
    double mx = -kInf;
    for (size_t j = 0; j < n; ++j) {
      const bool mp = lp[j] == -kInf, mq = lq[j] == -kInf;
      if (mp) {
        lu[j] = -kInf;  // a > 0
      } else if (mq) {
        lu[j] = a < 1.0 ? -kInf : kInf;
      } else {
        lu[j] = a * lp[j] + (1.0 - a) * lq[j];
      }
      mx = std::max(mx, lu[j]);
    }
    double log_s;
    if (mx == kInf || mx == -kInf) {
      log_s = mx;
    } else {
      double sum = 0.0;
      for (size_t j = 0; j < n; ++j) sum += std::exp(lu[j] - mx);
      log_s = mx + std::log(sum);
    }
    if (std::isinf(log_s)) {
      out.value = kInf;  // log 0 / (a - 1) with a < 1, or log inf / (a - 1) with a > 1
    } else {
      out.value = log_s / (a - 1.0);
      for (size_t j = 0; j < n; ++j) {
        const double w = std::exp(lu[j] - log_s);
        qa[j] = -w;
        pb[j] = a / (a - 1.0) * w;
      }
    }
  } else {
    double value = 0.0;
    for (size_t j = 0; j < n; ++j) {
      const Term tm = entry_term(kind, prm, lp[j], lq[j]);
      value += tm.g;
      qa[j] = tm.qa;
      pb[j] = tm.pb;
      tie[j] = tm.tie;
    }
    out.value = value;
  }

  // Error model of an fp32 evaluation: entry j's log-probabilities carry an absolute error of a
  // few ulps of L_j = |lp_j| + |lq_j| (plus |x / T| when the logits are divided by T != 1, whose
  // rounding is relative to the logits themselves), so a quantity depending on them through the
  // products qa_j, pb_j moves by ~eps * sum |qa_j| (1 + L_j). The scales below are these sums;
  // the tests allow ~1e-6 times them (8 ulps of fp32).
  double smax = -kInf, tmax = -kInf;
  for (size_t j = 0; j < n; ++j) {
    smax = std::max(smax, s[j]);
    tmax = std::max(tmax, t[j]);
  }
  auto finite_abs = [](double x) { return std::isfinite(x) ? std::fabs(x) : 0.0; };
  std::vector<double> mag(n);
  for (size_t j = 0; j < n; ++j) {
    mag[j] = 1.0 + finite_abs(lp[j]) + finite_abs(lq[j]);
    if (temp != 1.0)
      mag[j] += (finite_abs(s[j]) + finite_abs(t[j]) + finite_abs(smax) + finite_abs(tmax)) / temp;
  }
  double sum_qa = 0, sum_pb = 0, abs_qa = 0, abs_pb = 0, tie_mass = 0;
  for (size_t j = 0; j < n; ++j) {
    sum_qa += qa[j];
    sum_pb += pb[j];
    abs_qa += std::fabs(qa[j]) * mag[j];
    abs_pb += std::fabs(pb[j]) * mag[j];
    if (tie[j] && std::fabs(lp[j] - lq[j]) < 1e-5 * mag[j])
      tie_mass += std::exp(lp[j]) + std::exp(lq[j]);
    else tie[j] = 0;
  }
  // A value beyond the fp32 range is +inf for an fp32 kernel (and then has no gradient).
  if (out.value > static_cast<double>(std::numeric_limits<float>::max())) out.value = kInf;
  const bool infinite = std::isinf(out.value);
  // Kinds whose formula divides a difference of nearly equal numbers by a parameter amplify the
  // rounding errors of any fp32 evaluation by that factor.
  double cond = 1.0;
  if (kind == DivergenceKind::alpha_divergence)
    cond = 1.0 / std::min(std::fabs(prm.alpha), std::fabs(1.0 - prm.alpha));
  if (kind == DivergenceKind::renyi) cond = std::max(1.0, 1.0 / std::fabs(prm.alpha - 1.0));
  out.value_scale = infinite ? 0.0 : cond * (abs_qa + abs_pb + 1.0);
  if (!want_grads) return out;

  out.grad_s.assign(n, 0.0);
  out.grad_t.assign(n, 0.0);
  out.scale_s.assign(n, 0.0);
  out.scale_t.assign(n, 0.0);
  if (infinite) return out;
  // A tvd entry at a tie may take either side of |p - q| in fp32: its own gradient and, through
  // the softmax, every other entry's may move by O(q_j); widen the scales accordingly.
  constexpr double kTieSlack = 1e6;
  for (size_t j = 0; j < n; ++j) {
    const double q = std::exp(lq[j]);
    const double p = std::exp(lp[j]);
    out.grad_s[j] = (qa[j] - q * sum_qa) / temp;
    out.grad_t[j] = (pb[j] - p * sum_pb) / temp;
    out.scale_s[j] = cond *
                     (std::fabs(qa[j]) * mag[j] + q * (abs_qa + mag[j] + kTieSlack * tie_mass) +
                      (tie[j] ? kTieSlack * q : 0.0)) /
                     temp;
    out.scale_t[j] = cond *
                     (std::fabs(pb[j]) * mag[j] + p * (abs_pb + mag[j] + kTieSlack * tie_mass) +
                      (tie[j] ? kTieSlack * p : 0.0)) /
                     temp;
  }
  return out;
}

double row_value(const double* s, const double* t, int64_t v, const Params& prm) {
  return row(s, t, v, prm, /*want_grads=*/false).value;
}

Result divergence(const std::vector<double>& s, const std::vector<double>& t, int64_t n, int64_t v,
                  const Params& prm, const Options& opt, bool want_grads) {
  Result res;
  const size_t nv = static_cast<size_t>(n * v);
  if (want_grads) {
    res.grad_s.assign(nv, 0.0);
    res.grad_t.assign(nv, 0.0);
    res.scale_s.assign(nv, 0.0);
    res.scale_t.assign(nv, 0.0);
  }
  std::vector<double> row_loss(static_cast<size_t>(n), 0.0), row_scale(static_cast<size_t>(n), 0.0);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool active = opt.labels.empty() || opt.labels[i] != opt.ignore_index;
    if (!active) continue;
    ++count;
    const double w = opt.weights.empty() ? 1.0 : opt.weights[i];
    const RowResult rr = row(&s[i * v], &t[i * v], v, prm, want_grads);
    row_loss[i] = w * rr.value;
    row_scale[i] = std::fabs(w) * rr.value_scale;
    if (want_grads) {
      for (int64_t j = 0; j < v; ++j) {
        res.grad_s[i * v + j] = w * rr.grad_s[j];
        res.grad_t[i * v + j] = w * rr.grad_t[j];
        res.scale_s[i * v + j] = std::fabs(w) * rr.scale_s[j];
        res.scale_t[i * v + j] = std::fabs(w) * rr.scale_t[j];
      }
    }
  }

  double factor = 1.0;
  switch (opt.reduction) {
    case Reduction::none: factor = 1.0; break;
    case Reduction::sum:
      factor = opt.num_items_in_batch > 0 ? 1.0 / opt.num_items_in_batch : 1.0;
      break;
    case Reduction::mean: {
      const double d =
          opt.num_items_in_batch > 0 ? opt.num_items_in_batch : static_cast<double>(count);
      factor = d > 0 ? 1.0 / d : 0.0;
      break;
    }
    case Reduction::batchmean: {
      const double d = opt.num_items_in_batch > 0 ? opt.num_items_in_batch : static_cast<double>(n);
      factor = d > 0 ? 1.0 / d : 0.0;
      break;
    }
  }
  if (prm.scale_by_t_squared) factor *= prm.temperature * prm.temperature;

  if (opt.reduction == Reduction::none) {
    res.loss.resize(static_cast<size_t>(n));
    res.loss_scale.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      res.loss[i] = row_loss[i] * factor;
      res.loss_scale[i] = row_scale[i] * factor;
    }
  } else {
    double total = 0.0, total_scale = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      total += row_loss[i];
      total_scale += row_scale[i];
    }
    // An all-ignored batch gives 0 for every reduction (no 0 * inf here: there are no rows).
    res.loss = {count == 0 ? 0.0 : total * factor};
    res.loss_scale = {total_scale * factor};
  }
  if (want_grads) {
    for (size_t k = 0; k < nv; ++k) {
      res.grad_s[k] *= factor;
      res.grad_t[k] *= factor;
      res.scale_s[k] *= factor;
      res.scale_t[k] *= factor;
    }
  }
  return res;
}

double total_loss(const std::vector<double>& s, const std::vector<double>& t, int64_t n, int64_t v,
                  const Params& prm, const Options& opt) {
  const Result r = divergence(s, t, n, v, prm, opt, /*want_grads=*/false);
  double total = 0.0;
  for (double x : r.loss) total += x;
  return total;
}

}  // namespace divkit_ref
