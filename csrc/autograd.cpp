// The layer op's autograd, registered for the Autograd dispatch key of every backend. It was Python
// (torch.library.register_autograd), whose kernel every call passes through: measured at B=1, H=64, T=1, that
// cost about 100 us a call in grad mode and 10 us under no_grad, against 41 us for the op itself.
//
// Backward calls lstm_layer_backward. Under create_graph=True the gradients must be differentiable themselves,
// so backward then calls lstm_layer_recompute_backward instead, which fused_lstm/ops.py implements in Python
// with differentiable ATen ops (double backward is rare; that keeps one hand-written backward).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>

#include "layer.h"

namespace fused_lstm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardSignature = ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, bool);
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardSignature = BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                                         bool, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         BackwardMask);
using RecomputeSignature = std::vector<at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, at::ArrayRef<bool>);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// lstm_layer_forward's arguments in order; the first eight are the differentiable ones.
enum Argument { kX, kH0, kC0, kWih, kWhh, kBih, kBhh, kWhr, kBatchSizes, kReverse, kArguments };
constexpr int kDifferentiable = kBatchSizes;
// What forward saves, in order: the tensor arguments (undefined where absent), then these outputs.
enum SavedOutput { kOutput = kReverse, kGates, kCells };

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class Layer : public torch::autograd::Function<Layer> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                               const std::optional<at::Tensor>& batch_sizes, bool reverse) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto forward_op = op<ForwardSignature>("fused_lstm::lstm_layer_forward");
    auto [output, h_n, c_n, gates, cells] =
        forward_op.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
    const at::Tensor absent;
    ctx->save_for_backward({x, h0, c0, w_ih, w_hh, b_ih.value_or(absent), b_hh.value_or(absent),
                            w_hr.value_or(absent), batch_sizes.value_or(absent), output, gates, cells});
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({gates, cells});
    // Left to materialize, the context would fill a zero tensor for every output without a gradient at every
    // backward, gates [N, 4H] and cells [N, H] among them (they have none): backward makes the few it needs.
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n, gates, cells};
  }

  // grads: dL/d(output, h_n, c_n, gates, cells), undefined where none flows; the last two are never used, as
  // gates and cells are not differentiable. Returns one gradient per argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    for (auto [grad, like] : {std::pair<at::Tensor*, int>{&grads[0], kOutput}, {&grads[1], kH0}, {&grads[2], kC0}}) {
      if (!grad->defined()) {  // h_n is shaped like h0, c_n like c0
        *grad = at::zeros_symint(saved[like].sym_sizes(), saved[like].options());  // symbolic under compile
      }
    }
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const auto needed = needs_input_grad(ctx, saved);
    variable_list result(kArguments);
    if (at::GradMode::is_enabled()) {
      static const auto recompute_op = op<RecomputeSignature>("fused_lstm::lstm_layer_recompute_backward");
      const auto recomputed = recompute_op.call(grads[0], grads[1], grads[2], saved[kX], saved[kH0], saved[kC0],
                                                saved[kWih], saved[kWhh], present(saved[kBih]), present(saved[kBhh]),
                                                present(saved[kWhr]), present(saved[kBatchSizes]), reverse, needed);
      for (int i = 0; i < kDifferentiable; ++i) {
        result[i] = needed[i] ? recomputed[i] : at::Tensor();
      }
      return result;
    }
    static const auto backward_op = op<BackwardSignature>("fused_lstm::lstm_layer_backward");
    const bool has_bias = saved[kBih].defined();
    // The op's results in order (layer.h BackwardOutput): x, h0, c0, w_ih, w_hh, the bias, w_hr.
    const BackwardMask output_mask{needed[kX],   needed[kH0],  needed[kC0],
                                          needed[kWih], needed[kWhh], needed[kBih] || needed[kBhh],
                                          needed[kWhr]};
    auto [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] = backward_op.call(
        grads[0], grads[1], grads[2], saved[kX], saved[kH0], saved[kC0], saved[kWih], saved[kWhh],
        present(saved[kWhr]), present(saved[kBatchSizes]), reverse, has_bias, saved[kOutput], saved[kGates],
        saved[kCells], output_mask);
    for (auto [argument, gradient] : {std::pair{kX, &grad_x}, {kH0, &grad_h0}, {kC0, &grad_c0}, {kWih, &grad_w_ih},
                                      {kWhh, &grad_w_hh}, {kBih, &grad_bias}, {kBhh, &grad_bias},
                                      {kWhr, &grad_w_hr}}) {
      if (needed[argument]) {  // the others are empty placeholders, or absent arguments
        result[argument] = *gradient;
      }
    }
    return result;
  }

 private:
  // Whether each differentiable argument needs a gradient. The context numbers only the tensors that were
  // given (absent optional ones have no input edge), so this counts them off.
  static std::array<bool, kDifferentiable> needs_input_grad(AutogradContext* ctx, const variable_list& saved) {
    std::array<bool, kDifferentiable> needed{};
    size_t edge = 0;
    for (int i = 0; i < kDifferentiable; ++i) {
      if (saved[i].defined()) {
        needed[i] = ctx->needs_input_grad(edge++);
      }
    }
    return needed;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_autograd(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const variable_list out = Layer::apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_autograd);
}

}  // namespace fused_lstm
