// torch.ao's dynamic int8 linear layers, callable from compiled code: `gpa_hf::int8_linear`.
//
// `quantize_lm_dynamic_int8` makes the LM's layers torch.ao dynamic int8 linears, whose packed weights (fbgemm's, on
// x86) live in TorchScript objects that dynamo cannot trace. Registered once here (`register_int8_linear`, outside any
// graph), a layer is an integer that a compiled step passes to `int8_linear`, which runs the layer's own packed
// product: the eager layer's numbers, without a second copy of its weights.
#include <ATen/ATen.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace {

struct Int8Linear {
  c10::intrusive_ptr<LinearPackedParamsBase> params;
  bool reduce_range;
};

std::mutex registry_mutex;

std::vector<Int8Linear>& registry() {
  static std::vector<Int8Linear> layers;
  return layers;
}

// register_int8_linear(Any packed, bool reduce_range) -> int: boxed, as the packed object is a TorchScript class.
void register_int8_linear(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  const bool reduce_range = torch::jit::pop(*stack).toBool();
  const c10::IValue packed = torch::jit::pop(*stack);
  TORCH_CHECK(packed.isObject(), "register_int8_linear: expected a LinearPackedParamsBase, got ", packed.tagKind());
  const auto object = packed.toObject();
  const std::string name = object->type()->name()->qualifiedName();
  TORCH_CHECK(name == "__torch__.torch.classes.quantized.LinearPackedParamsBase",
              "register_int8_linear: expected a LinearPackedParamsBase, got ", name);
  auto params = c10::static_intrusive_pointer_cast<LinearPackedParamsBase>(object->getSlot(0).toCapsule());
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().push_back({std::move(params), reduce_range});
  torch::jit::push(*stack, static_cast<int64_t>(registry().size() - 1));
}

Int8Linear lookup(int64_t layer) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(registry().size()) && registry()[layer].params,
              "int8_linear: no registered layer ", layer);
  return registry()[layer];
}

at::Tensor int8_linear(const at::Tensor& input, int64_t layer) {
  TORCH_CHECK(input.scalar_type() == at::kFloat, "int8_linear: expected a float32 input, got ", input.scalar_type());
  const Int8Linear entry = lookup(layer);
  return entry.params->apply_dynamic(input.contiguous(), entry.reduce_range);
}

// Drops a layer's packed weights (its Python layer was garbage-collected); its number is not reused.
void release_int8_linear(int64_t layer) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(registry().size()), "int8_linear: no layer ", layer);
  registry()[layer].params.reset();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpa_hf, m) {
  m.def("register_int8_linear(Any packed, bool reduce_range) -> int",
        torch::CppFunction::makeFromBoxedFunction<&register_int8_linear>());
  m.def("int8_linear(Tensor input, int layer) -> Tensor");
  m.def("release_int8_linear(int layer) -> ()", release_int8_linear);
}

TORCH_LIBRARY_IMPL(gpa_hf, CPU, m) { m.impl("int8_linear", int8_linear); }
