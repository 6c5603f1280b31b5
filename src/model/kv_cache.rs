//! The key/value cache every family decodes with: each layer's keys and values of the positions
//! seen so far, so that generation feeds only the new token through the model, and attention of
//! the new queries against them.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// One layer's cache: keys and values, each [batch, kv_heads, capacity, head_dim], the first
/// `seen` positions written.
type KvSlot<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// Keys and values of every position seen so far, per layer. The buffers grow by whole blocks
/// of positions and are written in place, so a token's step has the shapes of the one before
/// it: on the GPU backends the fusion plans and autotuned kernels made for the first tokens
/// serve the rest.
pub struct KvCache<B: Backend> {
    layers: Vec<KvSlot<B>>,
    seen: usize,
    /// Positions the buffers hold (a multiple of `KV_BLOCK`, or the context).
    capacity: usize,
}

/// Positions a cache's buffers grow by.
const KV_BLOCK: usize = 128;

impl<B: Backend> KvCache<B> {
    pub fn new(n_layer: usize) -> Self {
        Self { layers: (0..n_layer).map(|_| None).collect(), seen: 0, capacity: 0 }
    }

    /// Where a step of `seq` new positions starts: after the positions `cache` holds, with room
    /// made for the new ones in a model of `context` positions; 0 without a cache.
    pub fn begin_step(cache: &mut Option<&mut Self>, seq: usize, context: usize) -> usize {
        match cache {
            Some(cache) => {
                let start = cache.seen;
                cache.reserve(seq, context);
                start
            }
            None => 0,
        }
    }

    /// How many positions the cache holds.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Make room for `new` positions more, in a model of `context` positions.
    fn reserve(&mut self, new: usize, context: usize) {
        let end = self.seen + new;
        self.capacity = self.capacity.max(end.next_multiple_of(KV_BLOCK).min(context.max(end)));
    }

    /// What layer `layer`'s attention needs of the cache this step.
    pub fn layer(&mut self, layer: usize) -> LayerCache<'_, B> {
        LayerCache { slot: &mut self.layers[layer], seen: self.seen, capacity: self.capacity }
    }

    /// Count the `new` positions every layer has now written.
    pub fn advance(&mut self, new: usize) {
        self.seen += new;
    }
}

/// What one layer's attention needs of the cache: its buffers, how many positions they held
/// before this step, and the capacity they must have for it.
pub struct LayerCache<'a, B: Backend> {
    slot: &'a mut KvSlot<B>,
    seen: usize,
    capacity: usize,
}

impl<B: Backend> LayerCache<'_, B> {
    /// Generation: the new positions' keys and values written into the cache after the `seen`
    /// ones, and the new queries against all of them, each query head reading key/value head
    /// `head / (heads / kv_heads)` (grouped-query attention; one each when they are equal).
    /// Scores cover the whole buffer (so that its shape, not the number of positions, sets the
    /// step's shapes); positions not written yet, and each query's future, are masked out.
    /// q: [batch, heads, seq, head_dim], k, v: [batch, kv_heads, seq, head_dim]
    /// → [batch, seq, heads·head_dim]
    pub fn attend(self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, heads, seq, head_dim] = q.dims();
        let kv_heads = k.dims()[1];
        let device = q.device();
        let LayerCache { slot, seen, capacity } = self;
        let buffer = |old: Option<Tensor<B, 4>>| match old {
            Some(old) if old.dims()[2] == capacity => old,
            Some(old) => {
                let grown = Tensor::zeros([batch, kv_heads, capacity - old.dims()[2], head_dim], &device);
                Tensor::cat(vec![old, grown], 2)
            }
            None => Tensor::zeros([batch, kv_heads, capacity, head_dim], &device),
        }; // [batch, kv_heads, capacity, head_dim]
        let (old_keys, old_values) = slot.take().unzip();
        let new = [0..batch, 0..kv_heads, seen..seen + seq, 0..head_dim];
        let keys = buffer(old_keys).slice_assign(new.clone(), k);
        let values = buffer(old_values).slice_assign(new, v);
        *slot = Some((keys.clone(), values.clone()));
        let (keys, values) = (repeat_heads(keys, heads), repeat_heads(values, heads)); // [batch, heads, capacity, head_dim]

        let scores = q.matmul(keys.swap_dims(2, 3)) / (head_dim as f64).sqrt(); // [batch, heads, seq, capacity]
                                                                                // Query i (position seen + i) sees keys 0..=seen + i.
        let key = Tensor::<B, 1, Int>::arange(0..capacity as i64, &device).unsqueeze::<2>().expand([seq, capacity]);
        let last = Tensor::<B, 1, Int>::arange(seen as i64..(seen + seq) as i64, &device)
            .unsqueeze_dim::<2>(1)
            .expand([seq, capacity]);
        let hidden = key.greater(last).unsqueeze::<4>().expand([batch, heads, seq, capacity]);
        let probs = softmax(scores.mask_fill(hidden, f32::NEG_INFINITY), 3); // [batch, heads, seq, capacity]
        probs.matmul(values).swap_dims(1, 2).reshape([batch, seq, heads * head_dim])
    }
}

/// Each key/value head repeated for the query heads that share it, in order (query head h
/// reads key/value head h / (heads / kv_heads)). x: [batch, kv_heads, n, head_dim] →
/// [batch, heads, n, head_dim]
fn repeat_heads<B: Backend>(x: Tensor<B, 4>, heads: usize) -> Tensor<B, 4> {
    let [batch, kv_heads, n, head_dim] = x.dims();
    if kv_heads == heads {
        return x;
    }
    let group = heads / kv_heads;
    x.unsqueeze_dim::<5>(2).expand([batch, kv_heads, group, n, head_dim]).reshape([batch, heads, n, head_dim])
}
