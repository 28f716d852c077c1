// Autograd kernels of prg_fast::stage_combine and prg_fast::stage_combine_into, for every device.
// In C++ so that a call needing no gradient (under no_grad, or with no input requiring grad: the
// engine's no-grad solve and its adjoint loops) goes straight to the device kernel; a Python
// autograd formula costs about 20 us per call even then. The formula is the one the Triton
// operator registers in Python (prg_fast/ode/ops.py): d out / d base = alpha,
// d out / d terms[j] = coeffs[j], each gradient one scaled copy made with ATen ops (so double
// backward works).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace prg_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool any_requires_grad(const at::Tensor& base, at::TensorList terms) {
  if (base.requires_grad()) return true;
  for (const auto& t : terms) {
    if (t.requires_grad()) return true;
  }
  return false;
}

at::Tensor call_stage_combine(const at::Tensor& base, at::TensorList terms,
                              at::ArrayRef<double> coeffs, double alpha,
                              std::optional<at::ScalarType> out_dtype) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("prg_fast::stage_combine", "")
          .typed<at::Tensor(const at::Tensor&, at::TensorList, at::ArrayRef<double>, double,
                            std::optional<at::ScalarType>)>();
  // Below autograd: the device kernel (or the fake kernel under tracing) runs next.
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(base, terms, coeffs, alpha, out_dtype);
}

struct StageCombineFunction : public torch::autograd::Function<StageCombineFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& base, at::TensorList terms,
                            at::ArrayRef<double> coeffs, double alpha,
                            std::optional<at::ScalarType> out_dtype) {
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["coeffs"] = coeffs.vec();
    ctx->saved_data["base_dtype"] = base.scalar_type();
    ctx->saved_data["term_dtype"] = terms.empty() ? base.scalar_type() : terms[0].scalar_type();
    return call_stage_combine(base, terms, coeffs, alpha, out_dtype);
  }

  // One gradient per input slot of forward: base, each term, then coeffs, alpha and out_dtype.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad = grad_outputs[0];
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const std::vector<double> coeffs = ctx->saved_data["coeffs"].toDoubleVector();
    const at::ScalarType base_dtype = ctx->saved_data["base_dtype"].toScalarType();
    const at::ScalarType term_dtype = ctx->saved_data["term_dtype"].toScalarType();
    variable_list grads;
    grads.reserve(coeffs.size() + 4);
    grads.push_back(grad.mul(at::Scalar(alpha)).to(base_dtype));
    for (const double c : coeffs) grads.push_back(grad.mul(at::Scalar(c)).to(term_dtype));
    grads.resize(coeffs.size() + 4);  // coeffs, alpha, out_dtype: not differentiable
    return grads;
  }
};

at::Tensor stage_combine_autograd(const at::Tensor& base, at::TensorList terms,
                                  at::ArrayRef<double> coeffs, double alpha,
                                  std::optional<at::ScalarType> out_dtype) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(base, terms)) {
    return call_stage_combine(base, terms, coeffs, alpha, out_dtype);
  }
  return StageCombineFunction::apply(base, terms, coeffs, alpha, out_dtype);
}

void stage_combine_into_autograd(const at::Tensor& base, at::TensorList terms,
                                 at::ArrayRef<double> coeffs, double alpha, const at::Tensor& out) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !(any_requires_grad(base, terms) || out.requires_grad()),
              "stage_combine_into: writes into `out` without recording a gradient, but an input or "
              "out requires grad under grad mode; use stage_combine (or torch.no_grad())");
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("prg_fast::stage_combine_into", "")
          .typed<void(const at::Tensor&, at::TensorList, at::ArrayRef<double>, double,
                      const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(base, terms, coeffs, alpha, out);
  }
  // out was written: its version moves, so a graph that saved it notices (as for torch's out=).
  if (!out.is_inference()) torch::autograd::impl::bump_version(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(prg_fast, Autograd, m) {
  m.impl("stage_combine", &stage_combine_autograd);
  m.impl("stage_combine_into", &stage_combine_into_autograd);
}

}  // namespace prg_fast
