//! Reverse-mode autograd.
//!
//! Each recorded op pushes one [`Node`]: a named [`Backward`] step holding only what that
//! backward needs (e.g. matmul saves its left operand only if the right one needs a gradient),
//! plus edges to the nodes or trainable leaves that produced its inputs. The nodes reachable from
//! a loss, in reverse topological order, are the tape that [`backward`] plays.
//!
//! Rules (tested in tests/engine.rs: accumulation, no graph without trainable inputs, frozen weights):
//! - An op is recorded only when grad mode is on and at least one input requires a gradient, so
//!   inference and frozen-only computations build no graph at all.
//! - Gradients accumulate with `+=`: a tensor used twice receives the sum of both contributions,
//!   and the [`GradStore`] adds into existing entries.
//! - Only trainable leaves ([`Tensor::param`]) get an entry in the [`GradStore`]. Frozen weights
//!   have no edge in the graph, so no gradient buffer can ever be created for them.
//! - A graph is played once: each backward step is consumed (and its saved tensors freed) as it
//!   runs, like PyTorch's `retain_graph=False`.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::device::with_float;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::{GradLink, Tensor, TensorId};

/// One step of the tape: the backward of one op.
pub trait Backward: Send + Sync {
    /// The op's name, used in error messages and graph dumps.
    fn name(&self) -> &'static str;

    /// `dy` is ∂L/∂y for this op's output y (same shape as y). Returns one entry per input, in
    /// the order the inputs were recorded: ∂L/∂input where `needs[i]`, `None` otherwise. The
    /// engine then does `grad[input] += returned` — implementations return fresh contributions
    /// and never accumulate themselves. `store` is for steps that run a nested backward
    /// (activation checkpointing) and must deposit parameter gradients directly.
    fn backward(&self, dy: &Tensor, needs: &[bool], store: &mut GradStore) -> Result<Vec<Option<Tensor>>>;
}

enum Edge {
    /// Constant input: no gradient flows back.
    None,
    /// A trainable leaf: its gradient goes to the GradStore.
    Leaf(TensorId),
    /// Produced by another recorded op.
    Node(Arc<Node>),
}

/// A recorded op in the graph.
pub struct Node {
    name: &'static str,
    step: Mutex<Option<Box<dyn Backward>>>,
    inputs: Vec<(Edge, Shape)>,
}

impl Node {
    pub fn name(&self) -> &'static str {
        self.name
    }
    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }
}

/// Gradients of the trainable leaves, keyed by tensor id.
#[derive(Default, Debug)]
pub struct GradStore {
    grads: HashMap<TensorId, Tensor>,
}

impl GradStore {
    pub fn new() -> Self {
        Self::default()
    }
    /// The accumulated gradient of `t`, if any reached it.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.grads.get(&t.id())
    }
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.grads.get(&id)
    }
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.grads.remove(&t.id())
    }
    pub fn contains(&self, t: &Tensor) -> bool {
        self.grads.contains_key(&t.id())
    }
    pub fn len(&self) -> usize {
        self.grads.len()
    }
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&TensorId, &Tensor)> {
        self.grads.iter()
    }
    /// Total number of gradient values held.
    pub fn numel(&self) -> usize {
        self.grads.values().map(|g| g.numel()).sum()
    }
    /// `grad[id] += g`.
    pub fn accumulate(&mut self, id: TensorId, g: Tensor) -> Result<()> {
        match self.grads.remove(&id) {
            None => {
                self.grads.insert(id, g);
            }
            Some(acc) => {
                let sum = add_grads(acc, &g)?;
                self.grads.insert(id, sum);
            }
        }
        Ok(())
    }
    /// Adds every gradient of `other` into `self`.
    pub fn merge(&mut self, other: GradStore) -> Result<()> {
        for (id, g) in other.grads {
            self.accumulate(id, g)?;
        }
        Ok(())
    }
}

/// `acc + g`, in place when `acc` owns its storage exclusively.
fn add_grads(acc: Tensor, g: &Tensor) -> Result<Tensor> {
    if acc.shape() != g.shape() || acc.dtype() != g.dtype() {
        return Err(Error::Autograd(format!("cannot accumulate a {} {} gradient into a {} {} one", g.dtype(), g.shape(), acc.dtype(), acc.shape())));
    }
    let k = crate::tensor::kernels_for("accumulate", &[("gradient", &acc), ("added gradient", g)])?;
    if !acc.same_storage(g) && acc.is_exclusive() {
        k.add_assign(&mut acc.write(), &g.read(), "accumulate")?;
        return Ok(acc);
    }
    let mut sum = k.zeros(acc.dtype(), acc.numel(), "accumulate")?;
    k.add(&mut sum, &acc.read(), &g.read(), "accumulate")?;
    Ok(Tensor::from_storage(sum, acc.shape().clone()))
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    static RECOMPUTING: Cell<bool> = const { Cell::new(false) };
}

/// True while a [`checkpoint`] backward re-runs its block to rebuild the graph. The block's
/// output *values* are then never read (only its graph is played), so a model may skip the work
/// of the block's last op that only produces values (see `Llama`'s down projection).
pub fn is_recomputing() -> bool {
    RECOMPUTING.with(|r| r.get())
}

struct RecomputeGuard(bool);
impl Drop for RecomputeGuard {
    fn drop(&mut self) {
        RECOMPUTING.with(|r| r.set(self.0));
    }
}

/// True unless inside [`no_grad`].
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

struct GradModeGuard(bool);
impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

fn with_grad_mode<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    let prev = GRAD_ENABLED.with(|g| g.replace(enabled));
    let _guard = GradModeGuard(prev);
    f()
}

/// Runs `f` without recording any op (inference, evaluation, optimizer updates).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    with_grad_mode(false, f)
}

/// Attaches a backward step to `out` if grad mode is on and some input requires a gradient.
/// `make` receives which inputs need gradients, so it can save only what those need.
pub(crate) fn record(out: Tensor, inputs: &[&Tensor], make: impl FnOnce(&[bool]) -> Box<dyn Backward>) -> Tensor {
    if !is_grad_enabled() {
        return out;
    }
    let needs: Vec<bool> = inputs.iter().map(|t| t.requires_grad()).collect();
    if !needs.iter().any(|&n| n) {
        return out;
    }
    attach(out, inputs, make(&needs))
}

fn attach(out: Tensor, inputs: &[&Tensor], step: Box<dyn Backward>) -> Tensor {
    let edges = inputs
        .iter()
        .map(|t| {
            let e = match t.link() {
                GradLink::None => Edge::None,
                GradLink::Leaf => Edge::Leaf(t.id()),
                GradLink::Node(n) => Edge::Node(n.clone()),
            };
            (e, t.shape().clone())
        })
        .collect();
    let node = Node { name: step.name(), step: Mutex::new(Some(step)), inputs: edges };
    out.relink(GradLink::Node(Arc::new(node)))
}

/// Backpropagates from a scalar loss (seed 1) and returns the gradients of all trainable leaves
/// it depends on.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    if loss.numel() != 1 {
        return Err(Error::Autograd(format!("backward() needs a scalar loss, got shape {}", loss.shape())));
    }
    let seed = with_float!(loss.dtype(), "backward", |T| { Ok(Tensor::full(T::ONE, loss.shape().clone())) })?;
    backward_with_seed(loss, seed)
}

/// Backpropagates `seed` = ∂L/∂root from an arbitrary tensor.
pub fn backward_with_seed(root: &Tensor, seed: Tensor) -> Result<GradStore> {
    if seed.shape() != root.shape() {
        return Err(Error::Autograd(format!("seed shape {} does not match root shape {}", seed.shape(), root.shape())));
    }
    let mut store = GradStore::new();
    let root_node = match root.link() {
        GradLink::None => return Err(Error::Autograd("backward(): the loss does not depend on any trainable tensor (no graph was recorded)".into())),
        GradLink::Leaf => {
            store.accumulate(root.id(), seed)?;
            return Ok(store);
        }
        GradLink::Node(n) => n.clone(),
    };
    let order = topo_order(&root_node);
    let mut pending: HashMap<usize, Tensor> = HashMap::new();
    pending.insert(root_node.key(), seed);
    no_grad(|| -> Result<()> {
        for node in order.iter().rev() {
            let Some(dy) = pending.remove(&node.key()) else { continue };
            let step = node
                .step
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| Error::Autograd(format!("the graph through '{}' was already used by a backward pass", node.name)))?;
            let needs: Vec<bool> = node.inputs.iter().map(|(e, _)| !matches!(e, Edge::None)).collect();
            let grads = {
                let _s = crate::profile::scope("bwd", node.name);
                step.backward(&dy, &needs, &mut store)?
            };
            drop(step);
            drop(dy);
            if grads.len() != node.inputs.len() {
                return Err(Error::Autograd(format!("'{}' returned {} gradients for {} inputs", node.name, grads.len(), node.inputs.len())));
            }
            for ((edge, shape), g) in node.inputs.iter().zip(grads) {
                let Some(g) = g else { continue };
                if g.shape() != shape {
                    return Err(Error::Autograd(format!("'{}' returned a gradient of shape {} for an input of shape {}", node.name, g.shape(), shape)));
                }
                match edge {
                    Edge::None => {}
                    Edge::Leaf(id) => store.accumulate(*id, g)?,
                    Edge::Node(n) => {
                        let k = n.key();
                        let acc = match pending.remove(&k) {
                            None => g,
                            Some(acc) => {
                                let _s = crate::profile::scope("bwd", "grad_accumulate");
                                add_grads(acc, &g)?
                            }
                        };
                        pending.insert(k, acc);
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok(store)
}

/// Nodes reachable from `root` in topological order (inputs before consumers), iteratively so
/// deep graphs cannot overflow the stack.
fn topo_order(root: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<(Arc<Node>, bool)> = vec![(root.clone(), false)];
    while let Some((node, expanded)) = stack.pop() {
        if expanded {
            order.push(node);
            continue;
        }
        if !seen.insert(node.key()) {
            continue;
        }
        stack.push((node.clone(), true));
        for (e, _) in &node.inputs {
            if let Edge::Node(n) = e {
                if !seen.contains(&n.key()) {
                    stack.push((n.clone(), false));
                }
            }
        }
    }
    order
}

/// Activation checkpointing: runs `f(x)` without recording, keeping only `x`; during backward
/// it recomputes `f(x)` with recording on and backpropagates through the recomputation.
/// Parameters captured by `f` (adapter weights) receive their gradients as usual. `f` must be
/// deterministic (same output for the same input).
pub fn checkpoint<F>(x: &Tensor, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !is_grad_enabled() {
        return f(x);
    }
    let y = no_grad(|| f(&x.detach()))?;
    let step = CheckpointBwd { x: x.detach(), f: Box::new(f) };
    // Recorded even if `x` needs no gradient: parameters inside `f` may.
    Ok(attach(y, &[x], Box::new(step)))
}

type BlockFn = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;

struct CheckpointBwd {
    x: Tensor,
    f: Box<BlockFn>,
}

impl Backward for CheckpointBwd {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn backward(&self, dy: &Tensor, needs: &[bool], store: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let xin = if needs[0] { self.x.relink(GradLink::Leaf) } else { self.x.detach() };
        let y = with_grad_mode(true, || {
            let _g = RecomputeGuard(RECOMPUTING.with(|r| r.replace(true)));
            (self.f)(&xin)
        })?;
        if y.shape() != dy.shape() {
            return Err(Error::Autograd(format!("checkpoint: recomputed output shape {} differs from the original {}", y.shape(), dy.shape())));
        }
        if !y.requires_grad() {
            return Ok(vec![None]);
        }
        let mut inner = backward_with_seed(&y, dy.clone())?;
        let dx = inner.grads.remove(&xin.id());
        store.merge(inner)?;
        Ok(vec![if needs[0] { dx } else { None }])
    }
}
