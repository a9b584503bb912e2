// The layer ops' autograd, registered for the Autograd dispatch key of every backend. It was Python
// (torch.library.register_autograd), whose kernel every call passes through: measured at B=1, H=64, T=1, that
// cost about 100 us a call in grad mode and 10 us under no_grad, against 41 us for the op itself.
//
// Backward calls lstm_layer_backward (a bidirectional layer's node: lstm_bidirectional_layer_backward, which
// runs both directions' backwards at once). Under create_graph=True the gradients must be differentiable
// themselves, so backward then calls lstm_layer_recompute_backward instead, which fused_lstm/ops.py implements
// in Python with differentiable ATen ops (double backward is rare; that keeps one hand-written backward).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <tuple>
#include <utility>

#include "layer.h"

namespace fused_lstm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = LayerForwardResult(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool);
using BackwardSignature = LayerBackwardResult(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
    bool, const at::Tensor&, const at::Tensor&, const at::Tensor&, BackwardMask);
using BidirectionalForwardSignature = BidirectionalForwardResult(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
using BidirectionalBackwardSignature = BidirectionalBackwardResult(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, BackwardMask,
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
// What a node saves: x and batch_sizes (undefined where absent), then for each direction its other tensor
// arguments (h0 to w_hr) and these outputs. DirectionSaved reads a direction's by these slots.
enum SavedOutput { kOutput = kReverse, kGates, kCells };
constexpr int kSavedShared = 2, kSavedPerDirection = (kWhr - kH0 + 1) + (kCells - kOutput + 1);

using DirectionGradients = std::array<at::Tensor, kDifferentiable>;  // one per differentiable argument
using NeededGradients = std::array<bool, kDifferentiable>;

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The tensors saved for one direction (0 or 1) of a node, by the slots of Argument and SavedOutput.
struct DirectionSaved {
  const variable_list& saved;
  int direction;
  const at::Tensor& operator[](int slot) const {
    if (slot == kX || slot == kBatchSizes) {
      return saved[slot == kX ? 0 : 1];
    }
    const int own = slot < kBatchSizes ? slot - kH0 : slot - kOutput + (kWhr - kH0 + 1);
    return saved[kSavedShared + direction * kSavedPerDirection + own];
  }
};

// What a node saves (above): `shared` is {x, batch_sizes}, `directions` each direction's h0 to w_hr, then its
// output, gates and cells.
variable_list to_save(const std::array<std::optional<at::Tensor>, kSavedShared>& shared,
                      std::initializer_list<std::array<std::optional<at::Tensor>, kSavedPerDirection>> directions) {
  variable_list saved;
  for (const auto& tensor : shared) {
    saved.push_back(tensor.value_or(at::Tensor()));
  }
  for (const auto& direction : directions) {
    for (const auto& tensor : direction) {
      saved.push_back(tensor.value_or(at::Tensor()));
    }
  }
  return saved;
}

// grads[first + 0, 1, 2]: dL/d(output, h_n, c_n) of a direction, undefined where none flows; zeros then (h_n
// is shaped like h0, c_n like c0).
void fill_absent_gradients(variable_list& grads, int first, const DirectionSaved& saved) {
  for (auto [offset, like] : {std::pair<int, int>{0, kOutput}, {1, kH0}, {2, kC0}}) {
    at::Tensor& grad = grads[first + offset];
    if (!grad.defined()) {
      grad = at::zeros_symint(saved[like].sym_sizes(), saved[like].options());  // symbolic under compile
    }
  }
}

// values[i] where needed[i], else undefined (no gradient).
DirectionGradients only_needed(const DirectionGradients& values, const NeededGradients& needed) {
  DirectionGradients result;
  for (int i = 0; i < kDifferentiable; ++i) {
    result[i] = needed[i] ? values[i] : at::Tensor();
  }
  return result;
}

// Under create_graph=True: differentiable gradients, by lstm_layer_recompute_backward.
DirectionGradients recomputed_gradients(const variable_list& grads, int first, const DirectionSaved& saved,
                                        const NeededGradients& needed, bool reverse) {
  static const auto recompute_op = op<RecomputeSignature>("fused_lstm::lstm_layer_recompute_backward");
  const auto recomputed = recompute_op.call(
      grads[first], grads[first + 1], grads[first + 2], saved[kX], saved[kH0], saved[kC0], saved[kWih],
      saved[kWhh], present(saved[kBih]), present(saved[kBhh]), present(saved[kWhr]), present(saved[kBatchSizes]),
      reverse, needed);
  DirectionGradients values;
  std::copy(recomputed.begin(), recomputed.end(), values.begin());
  return only_needed(values, needed);
}

// The backward op's output_mask for a direction: its results are x, h0, c0, w_ih, w_hh, the bias (one for
// both biases) and w_hr (layer.h BackwardOutput).
BackwardMask backward_mask(const NeededGradients& needed) {
  return {needed[kX], needed[kH0], needed[kC0], needed[kWih], needed[kWhh], needed[kBih] || needed[kBhh],
          needed[kWhr]};
}

// The backward op's results for a direction, as gradients of the arguments that need one (the others are
// empty placeholders, or absent arguments).
DirectionGradients gradients_of_arguments(const LayerBackwardResult& results, const NeededGradients& needed) {
  const auto& [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] = results;
  return only_needed({grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_bias, grad_w_hr}, needed);
}

// Whether each differentiable argument of a node needs a gradient, given which were given (absent optional
// ones have no input edge, and the context numbers only the others).
template <size_t kCount>
std::array<bool, kCount> needs_input_grad(AutogradContext* ctx, const std::array<bool, kCount>& given) {
  std::array<bool, kCount> needed{};
  size_t edge = 0;
  for (size_t i = 0; i < kCount; ++i) {
    if (given[i]) {
      needed[i] = ctx->needs_input_grad(edge++);
    }
  }
  return needed;
}

// Which of a direction's differentiable arguments were given.
NeededGradients given_arguments(const DirectionSaved& saved) {
  NeededGradients given{};
  for (int i = 0; i < kDifferentiable; ++i) {
    given[i] = saved[i].defined();
  }
  return given;
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
    ctx->save_for_backward(to_save({x, batch_sizes}, {{h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, output, gates, cells}}));
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
    const variable_list saved_list = ctx->get_saved_variables();
    const DirectionSaved saved{saved_list, 0};
    fill_absent_gradients(grads, 0, saved);
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const NeededGradients needed = needs_input_grad(ctx, given_arguments(saved));
    DirectionGradients gradients;
    if (at::GradMode::is_enabled()) {
      gradients = recomputed_gradients(grads, 0, saved, needed, reverse);
    } else {
      static const auto backward_op = op<BackwardSignature>("fused_lstm::lstm_layer_backward");
      gradients = gradients_of_arguments(
          backward_op.call(grads[0], grads[1], grads[2], saved[kX], saved[kH0], saved[kC0], saved[kWih],
                           saved[kWhh], present(saved[kWhr]), present(saved[kBatchSizes]), reverse,
                           saved[kBih].defined(), saved[kOutput], saved[kGates], saved[kCells],
                           backward_mask(needed)),
          needed);
    }
    variable_list result(kArguments);
    std::copy(gradients.begin(), gradients.end(), result.begin());
    return result;
  }
};

// lstm_bidirectional_layer_forward's arguments: x, the forward direction's h0 to w_hr, the reverse
// direction's, then batch_sizes. The differentiable ones are all but batch_sizes.
constexpr int kBidirectionalDifferentiable = 1 + 2 * (kDifferentiable - 1);

class BidirectionalLayer : public torch::autograd::Function<BidirectionalLayer> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                               const at::Tensor& h0_reverse, const at::Tensor& c0_reverse,
                               const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
                               const std::optional<at::Tensor>& b_ih_reverse,
                               const std::optional<at::Tensor>& b_hh_reverse,
                               const std::optional<at::Tensor>& w_hr_reverse,
                               const std::optional<at::Tensor>& batch_sizes) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto forward_op = op<BidirectionalForwardSignature>("fused_lstm::lstm_bidirectional_layer_forward");
    auto [output, h_n, c_n, gates, cells, output_reverse, h_n_reverse, c_n_reverse, gates_reverse, cells_reverse] =
        forward_op.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, h0_reverse, c0_reverse, w_ih_reverse, w_hh_reverse,
                        b_ih_reverse, b_hh_reverse, w_hr_reverse, batch_sizes);
    ctx->save_for_backward(to_save({x, batch_sizes}, {{h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, output, gates, cells},
                                                      {h0_reverse, c0_reverse, w_ih_reverse, w_hh_reverse, b_ih_reverse,
                                                       b_hh_reverse, w_hr_reverse, output_reverse, gates_reverse,
                                                       cells_reverse}}));
    // One call: each replaces the set of outputs marked before.
    ctx->mark_non_differentiable({gates, cells, gates_reverse, cells_reverse});
    ctx->set_materialize_grads(false);  // as Layer's
    return {output, h_n, c_n, gates, cells, output_reverse, h_n_reverse, c_n_reverse, gates_reverse, cells_reverse};
  }

  // grads: dL/d(output, h_n, c_n, gates, cells) of the forward direction, then of the reverse one, undefined
  // where none flows. Returns one gradient per argument; x's is the sum of the two directions'.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr int kGradsPerDirection = 5;
    const variable_list saved_list = ctx->get_saved_variables();
    const std::array<DirectionSaved, 2> saved{DirectionSaved{saved_list, 0}, DirectionSaved{saved_list, 1}};
    const std::array<NeededGradients, 2> needed = needed_per_direction(ctx, saved);
    std::array<DirectionGradients, 2> gradients;
    for (int direction = 0; direction < 2; ++direction) {
      fill_absent_gradients(grads, direction * kGradsPerDirection, saved[direction]);
    }
    if (at::GradMode::is_enabled()) {
      for (int direction = 0; direction < 2; ++direction) {
        gradients[direction] = recomputed_gradients(grads, direction * kGradsPerDirection, saved[direction],
                                                    needed[direction], direction == 1);
      }
    } else {
      static const auto backward_op =
          op<BidirectionalBackwardSignature>("fused_lstm::lstm_bidirectional_layer_backward");
      const auto& [forward, reverse] = saved;
      const auto results = backward_op.call(
          grads[0], grads[1], grads[2], grads[kGradsPerDirection], grads[kGradsPerDirection + 1],
          grads[kGradsPerDirection + 2], forward[kX], forward[kH0], forward[kC0], forward[kWih], forward[kWhh],
          present(forward[kWhr]), reverse[kH0], reverse[kC0], reverse[kWih], reverse[kWhh], present(reverse[kWhr]),
          present(forward[kBatchSizes]), forward[kBih].defined(), reverse[kBih].defined(), forward[kOutput],
          forward[kGates], forward[kCells], reverse[kOutput], reverse[kGates], reverse[kCells],
          backward_mask(needed[0]), backward_mask(needed[1]));
      gradients = {gradients_of_arguments(direction_results<0>(results), needed[0]),
                   gradients_of_arguments(direction_results<1>(results), needed[1])};
    }
    variable_list result(kBidirectionalDifferentiable + 1);  // no gradient for batch_sizes
    const auto& [forward, reverse] = gradients;
    result[0] = !forward[kX].defined()   ? reverse[kX]
                : !reverse[kX].defined() ? forward[kX]
                                         : forward[kX].add(reverse[kX]);
    std::copy(forward.begin() + 1, forward.end(), result.begin() + 1);
    std::copy(reverse.begin() + 1, reverse.end(), result.begin() + kDifferentiable);
    return result;
  }

 private:
  // Which of each direction's differentiable arguments need a gradient (x's: whether x needs one).
  static std::array<NeededGradients, 2> needed_per_direction(AutogradContext* ctx,
                                                             const std::array<DirectionSaved, 2>& saved) {
    std::array<bool, kBidirectionalDifferentiable> given{};
    const NeededGradients forward = given_arguments(saved[0]), reverse = given_arguments(saved[1]);
    std::copy(forward.begin(), forward.end(), given.begin());
    std::copy(reverse.begin() + 1, reverse.end(), given.begin() + kDifferentiable);
    const auto needed = needs_input_grad(ctx, given);
    std::array<NeededGradients, 2> result{};
    std::copy(needed.begin(), needed.begin() + kDifferentiable, result[0].begin());
    result[1][kX] = needed[kX];
    std::copy(needed.begin() + kDifferentiable, needed.end(), result[1].begin() + 1);
    return result;
  }

  // The backward op's results of one direction (0 or 1).
  template <size_t kDirection>
  static LayerBackwardResult direction_results(const BidirectionalBackwardResult& results) {
    constexpr size_t kCount = std::tuple_size_v<LayerBackwardResult>;
    return [&]<size_t... kIndex>(std::index_sequence<kIndex...>) {
      return LayerBackwardResult{std::get<kDirection * kCount + kIndex>(results)...};
    }(std::make_index_sequence<kCount>());
  }
};

// The Autograd kernel of an op of this Signature whose node is Function: the node's outputs as the op's tuple.
template <class Function, typename Signature>
struct AutogradKernel;

template <class Function, typename Result, typename... Args>
struct AutogradKernel<Function, Result(Args...)> {
  static Result call(Args... args) {
    return as_result(Function::apply(args...), std::make_index_sequence<std::tuple_size_v<Result>>());
  }

 private:
  template <size_t... kIndex>
  static Result as_result(const variable_list& outputs, std::index_sequence<kIndex...>) {
    return {outputs[kIndex]...};
  }
};

// The Autograd kernel of the inference ops, which keep nothing for backward: a call that autograd would record
// (grad mode, and an argument that requires grad), or whose arguments carry forward-mode tangents, is refused,
// rather than returning outputs without a gradient; any other goes on to the backend's kernel.
void refused_if_recorded(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto arguments = torch::jit::last(*stack, op.schema().arguments().size());
  const auto any_tensor = [&](const auto& predicate) {
    return std::any_of(arguments.begin(), arguments.end(), [&](const c10::IValue& value) {
      return value.isTensor() && value.toTensor().defined() && predicate(value.toTensor());
    });
  };
  const bool recorded =
      at::GradMode::is_enabled() && any_tensor([](const at::Tensor& t) { return t.requires_grad(); });
  TORCH_CHECK(!recorded, "fused_lstm: ", op.schema().name(),
              " keeps nothing for backward, but an argument requires grad: call the forward op, which does "
              "(fused_lstm.ops.lstm_layer chooses)");
  const bool has_tangents = any_tensor([](const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); });
  TORCH_CHECK(!has_tangents, "fused_lstm: ", op.schema().name(),
              " does not carry forward-mode AD tangents, and an argument has one");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("lstm_layer_forward", &AutogradKernel<Layer, ForwardSignature>::call);
  m.impl("lstm_bidirectional_layer_forward", &AutogradKernel<BidirectionalLayer, BidirectionalForwardSignature>::call);
  m.impl("lstm_layer_inference", torch::CppFunction::makeFromBoxedFunction<&refused_if_recorded>());
  m.impl("lstm_bidirectional_layer_inference", torch::CppFunction::makeFromBoxedFunction<&refused_if_recorded>());
}

}  // namespace fused_lstm
