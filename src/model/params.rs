//! A model's parameters by name: each float parameter's module path (`h.0.attn.c_attn.weight`),
//! as burn's visitors report it. Saving, loading and the ids that key the optimizer state all
//! walk the module through these, so every parameter a model has is covered by each of them.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// The module path being walked, kept by `enter_module`/`exit_module`. An enum module's
/// variant (the model family: `Model::Gpt2`) is not part of the path: a parameter's name is
/// its name in the family's own checkpoints.
#[derive(Default)]
struct Path(Vec<Option<String>>);

impl Path {
    fn enter(&mut self, name: &str, container: &str) {
        self.0.push((!container.starts_with("Enum:")).then(|| name.to_string()));
    }

    fn exit(&mut self) {
        self.0.pop();
    }

    fn name(&self) -> String {
        self.0.iter().flatten().cloned().collect::<Vec<_>>().join(".")
    }
}

/// What a named visit does with each float parameter.
trait Sink<B: Backend> {
    fn float<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>);
}

/// A visitor that tracks the module path and hands each float parameter to its sink by name.
struct Named<S> {
    path: Path,
    sink: S,
}

impl<B: Backend, S: Sink<B>> ModuleVisitor<B> for Named<S> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.sink.float(self.path.name(), param);
    }
}

fn visit_named<B: Backend, M: Module<B>, S: Sink<B>>(module: &M, sink: S) -> S {
    let mut named = Named { path: Path::default(), sink };
    module.visit(&mut named);
    named.sink
}

/// Every float parameter's name and id, in the module's visiting order.
pub fn ids<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, ParamId)> {
    struct Ids(Vec<(String, ParamId)>);
    impl<B: Backend> Sink<B> for Ids {
        fn float<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>) {
            self.0.push((name, param.id));
        }
    }
    visit_named(module, Ids(Vec::new())).0
}

/// Every float parameter's name, id and shape, in the module's visiting order.
pub fn shapes<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, ParamId, Vec<usize>)> {
    struct Shapes(Vec<(String, ParamId, Vec<usize>)>);
    impl<B: Backend> Sink<B> for Shapes {
        fn float<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>) {
            self.0.push((name, param.id, param.val().dims().to_vec()));
        }
    }
    visit_named(module, Shapes(Vec::new())).0
}

/// Every float parameter's name and values, in visiting order.
pub fn tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, TensorData)> {
    struct Values(Vec<(String, TensorData)>);
    impl<B: Backend> Sink<B> for Values {
        fn float<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>) {
            self.0.push((name, param.val().into_data()));
        }
    }
    visit_named(module, Values(Vec::new())).0
}

/// What a named map does with each float parameter.
trait MapSink<B: Backend> {
    fn float<const D: usize>(&mut self, name: String, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>>;
}

/// A mapper that tracks the module path and hands each float parameter to its sink by name.
impl<B: Backend, S: MapSink<B>> ModuleMapper<B> for Named<S> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        self.sink.float(self.path.name(), param)
    }
}

fn map_named<B: Backend, M: Module<B>, S: MapSink<B>>(module: M, sink: S) -> (M, S) {
    let mut named = Named { path: Path::default(), sink };
    let module = module.map(&mut named);
    (module, named.sink)
}

/// Replace every float parameter's values with `source(name, shape)`, keeping its id. Returns
/// the module, or the first parameter `source` could not give (its error).
/// Initialise every lazily created parameter now. burn draws a new parameter's values when it
/// is first read, from the backend's generator as it stands then; reading them all right after
/// the model is made ties the weights to the run's seed alone (not to whatever seeds the
/// generator later, such as the first step's dropout), and lets clones share them.
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct Touch;
    impl<B: Backend> ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// A 64-bit digest of every parameter's name and bytes: equal models give equal digests.
pub fn fingerprint<B: Backend, M: Module<B>>(module: &M) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (name, data) in tensors(module) {
        hasher.update(name.as_bytes());
        hasher.update(data.as_bytes());
    }
    u64::from_le_bytes(hasher.finalize()[..8].try_into().expect("8 bytes"))
}

pub fn load<B: Backend, M: Module<B>>(
    module: M,
    source: impl FnMut(&str, &[usize]) -> anyhow::Result<TensorData>,
) -> anyhow::Result<M> {
    struct Load<F> {
        source: F,
        error: Option<anyhow::Error>,
    }
    impl<B: Backend, F: FnMut(&str, &[usize]) -> anyhow::Result<TensorData>> MapSink<B> for Load<F> {
        fn float<const D: usize>(&mut self, name: String, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            if self.error.is_some() {
                return Param::from_mapped_value(id, tensor, mapper);
            }
            match (self.source)(&name, &tensor.dims()) {
                Ok(data) => {
                    // The loaded values train as the initial ones would have.
                    let loaded = Tensor::from_data(data, &tensor.device()).set_require_grad(tensor.is_require_grad());
                    Param::from_mapped_value(id, loaded, mapper)
                }
                Err(error) => {
                    self.error = Some(error);
                    Param::from_mapped_value(id, tensor, mapper)
                }
            }
        }
    }
    let (module, load) = map_named(module, Load { source, error: None });
    match load.error {
        Some(error) => Err(error),
        None => Ok(module),
    }
}

/// Give each float parameter the id recorded for its name (a checkpoint's, so that the
/// optimizer state saved with it finds its parameters). Every parameter must have one and
/// every recorded name must be a parameter; otherwise the names that do not match.
pub fn set_ids<B: Backend, M: Module<B>>(module: M, ids: &BTreeMap<String, u64>) -> Result<M, String> {
    struct SetIds<'a> {
        ids: &'a BTreeMap<String, u64>,
        unmatched: Vec<String>,
        seen: BTreeSet<String>,
    }
    impl<B: Backend> MapSink<B> for SetIds<'_> {
        fn float<const D: usize>(&mut self, name: String, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let id = match self.ids.get(&name) {
                Some(&recorded) => ParamId::from(recorded),
                None => {
                    self.unmatched.push(format!("no id recorded for parameter `{name}`"));
                    id
                }
            };
            self.seen.insert(name);
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    let (module, mut set) = map_named(module, SetIds { ids, unmatched: Vec::new(), seen: BTreeSet::new() });
    let strays = ids.keys().filter(|name| !set.seen.contains(*name));
    set.unmatched.extend(strays.map(|name| format!("`{name}` is not a parameter")));
    match set.unmatched.is_empty() {
        true => Ok(module),
        false => Err(set.unmatched.join("; ")),
    }
}

/// `data` [rows, cols] → [cols, rows]
pub fn transposed(data: TensorData) -> TensorData {
    let [rows, cols] = [data.shape[0], data.shape[1]];
    let values = data.to_vec::<f32>().expect("weights are read as f32");
    let mut out = vec![0.0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    TensorData::new(out, [cols, rows])
}
