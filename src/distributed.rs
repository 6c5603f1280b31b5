//! Data-parallel training on burn-collective: one peer per device, threads within a process
//! (`run.devices`) and processes across machines (`[distributed]`, meeting through
//! burn-collective's orchestrator). Every peer holds the whole model; each optimizer step's
//! examples are split between them, and one all-reduce per step sums their gradients, so every
//! peer applies the same update. This module is the seam: the training loop asks a `Peer` for
//! its share of a step and for sums over all peers, and never sees burn-collective itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use crate::model::TrainBackend;
use crate::spec::Spec;

/// Run burn-collective's orchestrator on `bind`:`port` until the process is stopped (check the
/// port with [`port_free`] first).
pub fn serve_orchestrator(bind: IpAddr, port: u16) -> Result<()> {
    burn_communication::websocket::set_bind_address(bind);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// Refuses a port that cannot be listened on at `bind`, as burn-communication's servers will:
/// their own failure to listen is only logged, and the nodes would wait for one another until
/// the timeout.
pub fn port_free(bind: IpAddr, port: u16, what: &str) -> Result<()> {
    match std::net::TcpListener::bind((bind, port)) {
        Ok(_) => Ok(()),
        Err(e) => Err(crate::error::bad_input(format!(
            "{what}: port {port} cannot be listened on at {bind} ({e}); is another process (an orchestrator or \
             node of an earlier run?) using it?"
        ))),
    }
}

/// How a run's peers are laid out: `local` peers (threads) in each of `nodes` processes.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub local: usize,
    /// The local peers' device indices (`run.devices`).
    devices: Vec<usize>,
    pub nodes: usize,
    /// This process's node rank.
    pub node: usize,
    pub timeout: Duration,
    /// The orchestrator, this node's address and its data port, when there are several nodes.
    global: Option<(String, String, u16)>,
    /// This node starts the orchestrator.
    serves_orchestrator: bool,
    /// Where this node's servers listen (`distributed.bind`).
    bind: IpAddr,
}

impl Topology {
    pub fn of(spec: &Spec) -> Self {
        let local = spec.run.devices.len().max(1);
        match &spec.distributed {
            Some(d) => Self {
                local,
                devices: spec.run.devices.clone(),
                nodes: d.nodes,
                node: d.rank,
                timeout: Duration::from_secs_f64(d.timeout_s),
                global: (d.nodes > 1).then(|| (d.orchestrator.clone(), d.host.clone(), d.port)),
                serves_orchestrator: d.nodes > 1 && d.rank == 0 && d.serve_orchestrator,
                // Validated as an address.
                bind: d.bind.parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            },
            None => Self {
                local,
                devices: spec.run.devices.clone(),
                nodes: 1,
                node: 0,
                timeout: Duration::from_secs(600),
                global: None,
                serves_orchestrator: false,
                bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            },
        }
    }

    /// Peers in all: every node runs the same number.
    pub fn world(&self) -> usize {
        self.local * self.nodes
    }

    /// The ports this node listens on (its data port, and the orchestrator's where it serves
    /// it) can be listened on: checked before a run folder is made, and again as they open.
    pub fn check_ports(&self) -> Result<()> {
        if let Some((_, _, port)) = &self.global {
            port_free(self.bind, *port, "distributed.port")?;
        }
        if let Some(port) = self.served_orchestrator_port() {
            port_free(self.bind, port, "distributed.orchestrator (served by this node)")?;
        }
        Ok(())
    }

    /// The orchestrator's port, when this node serves it.
    fn served_orchestrator_port(&self) -> Option<u16> {
        let (orchestrator, _, _) = self.global.as_ref().filter(|_| self.serves_orchestrator)?;
        // Validated as host:port.
        Some(orchestrator.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or_default())
    }

    /// This node's data address as the other nodes reach it (IPv4), for a run on several.
    pub fn address(&self) -> Option<SocketAddr> {
        let (_, host, port) = self.global.as_ref()?;
        (host.as_str(), *port).to_socket_addrs().ok()?.find(SocketAddr::is_ipv4)
    }

    /// This process's peers, by global rank.
    pub fn local_ranks(&self) -> std::ops::Range<usize> {
        self.node * self.local..(self.node + 1) * self.local
    }

    /// The device of global rank `rank`: `run.devices[rank's local index]` of `main`'s kind.
    pub fn device_of<B: Backend>(&self, rank: usize, main: &B::Device) -> B::Device {
        use burn::tensor::backend::DeviceOps;
        let mut id = main.id();
        if let Some(&index) = self.devices.get(rank - self.local_ranks().start) {
            id.index_id = index as u16;
        }
        <B::Device as burn::tensor::backend::Device>::from_id(id)
    }

    /// Why the orchestrator of a run on several nodes cannot be reached, if it cannot.
    fn orchestrator_unreachable(&self) -> Option<String> {
        let (orchestrator, ..) = self.global.as_ref()?;
        let port = orchestrator.rsplit_once(':').map_or("", |(_, port)| port);
        let fix = format!(
            "start `pipe orchestrator --port {port}` there, or let node 0 serve it (distributed.serve_orchestrator = true)"
        );
        let address = match orchestrator.to_socket_addrs().map(|mut all| all.next()) {
            Ok(Some(address)) => address,
            Ok(None) => return Some(format!("the orchestrator's address {orchestrator} resolves to nothing")),
            Err(e) => return Some(format!("the orchestrator's address {orchestrator} does not resolve ({e})")),
        };
        match TcpStream::connect_timeout(&address, Duration::from_secs(1)) {
            Ok(_) => None,
            Err(e) => Some(format!("the orchestrator at {orchestrator} does not answer ({e}): {fix}")),
        }
    }

    fn config(&self) -> Result<CollectiveConfig> {
        let config = CollectiveConfig::default().with_num_devices(self.local);
        let Some((orchestrator, host, port)) = &self.global else { return Ok(config) };
        let parse = |s: String| s.parse().map_err(|e: String| anyhow!(e));
        Ok(config
            .with_num_nodes(self.nodes as u32)
            .with_global_address(parse(format!("ws://{orchestrator}"))?)
            .with_node_address(parse(format!("ws://{host}:{port}"))?)
            .with_data_service_port(*port))
    }
}

/// What the peers of one process share: who got where, who failed, and whose turn it is to
/// draw dropout masks.
struct LocalPeers {
    first_rank: usize,
    /// Per local peer: how many collective calls it has entered.
    reached: Vec<AtomicUsize>,
    failed: Mutex<Option<(usize, String)>>,
    /// The backend's random generator is one per process: peers draw their dropout masks (in
    /// the forward pass) one at a time, each after seeding it for its (step, rank).
    forward: Mutex<()>,
}

/// One peer of a data-parallel run. Made by `Peers::join`, one per thread.
pub struct Peer {
    pub rank: usize,
    pub world: usize,
    /// Peers per node, and every node's data address (learnt in `agree`) for naming the one
    /// that is gone when a collective call fails.
    local_count: usize,
    nodes: Vec<Option<SocketAddr>>,
    id: PeerId,
    timeout: Duration,
    calls: usize,
    logged_size: bool,
    local: Arc<LocalPeers>,
}

/// The peers this process runs, before each joins on its own thread.
pub struct Peers {
    topology: Topology,
    local: Arc<LocalPeers>,
}

impl Peers {
    pub fn new(topology: Topology) -> Result<Self> {
        topology.check_ports()?;
        burn_communication::websocket::set_bind_address(topology.bind);
        if let Some(port) = topology.served_orchestrator_port() {
            let bind = topology.bind;
            std::thread::spawn(move || serve_orchestrator(bind, port));
        }
        let local = Arc::new(LocalPeers {
            first_rank: topology.local_ranks().start,
            reached: (0..topology.local).map(|_| AtomicUsize::new(0)).collect(),
            failed: Mutex::new(None),
            forward: Mutex::new(()),
        });
        Ok(Self { topology, local })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Register global rank `rank` (one of this process's) with burn-collective; returns when
    /// every peer of the run has registered.
    pub fn join<B: Backend>(&self, rank: usize, device: &B::Device) -> Result<Peer> {
        let mut peer = Peer {
            rank,
            world: self.topology.world(),
            local_count: self.topology.local,
            nodes: Vec::new(),
            id: PeerId(rank as u32),
            timeout: self.topology.timeout,
            calls: 0,
            logged_size: false,
            local: self.local.clone(),
        };
        let (id, device, config) = (peer.id, device.clone(), self.topology.config()?);
        let joined = peer.collective("joining the run", move || {
            burn_collective::register::<B>(id, device, config).map(|()| Tensor::<B, 1>::empty([0], &Default::default()))
        });
        // Waiting out the timeout to join has two causes worth naming: no orchestrator, or a
        // node refused for other settings (which is told so itself). An orchestrator node 0
        // served is gone once node 0 is refused, so its absence may be either.
        const REFUSED: &str =
            "a node whose distributed.nodes or run.devices differ is refused as it joins, so compare the nodes' specs";
        match joined {
            Ok(_) => Ok(peer),
            Err(e) if !e.is::<TimedOut>() => Err(e),
            Err(e) => match self.topology.orchestrator_unreachable() {
                Some(why) => Err(anyhow!("{e:#}; {why}; if it was up and the node serving it stopped, {REFUSED}")),
                None if self.topology.global.is_some() => Err(anyhow!("{e:#}; {REFUSED}")),
                None => Err(e),
            },
        }
    }

    /// The first local peer that failed, if one did.
    pub fn first_failed(&self) -> Option<usize> {
        self.local.failed.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(rank, _)| *rank)
    }

    /// Record that local peer `rank` failed, so the others stop at their next all-reduce
    /// instead of waiting for it.
    pub fn fail(&self, rank: usize, error: &anyhow::Error) {
        let mut failed = self.local.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert((rank, format!("{error:#}")));
    }
}

impl Peer {
    /// Rank 0 writes the run: metrics, checkpoints, the final model.
    pub fn writes(&self) -> bool {
        self.rank == 0
    }

    /// This peer's examples of an optimizer step: the step's examples in order, `per_peer` to
    /// a peer by rank (the last, short step may leave a peer none).
    pub fn share<'a, T>(&self, step: &'a [T], per_peer: usize) -> &'a [T] {
        step.chunks(per_peer).nth(self.rank).unwrap_or(&[])
    }

    /// Hold while drawing random numbers from the backend's generator (see `LocalPeers`).
    pub fn forward_turn(&self) -> MutexGuard<'_, ()> {
        self.local.forward.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The element-wise sum of `values` over all peers.
    pub fn sum<B: Backend>(&mut self, values: &[f64], what: &str, device: &B::Device) -> Result<Vec<f64>> {
        let tensor = Tensor::<B, 1>::from_data(
            TensorData::new(values.iter().map(|&v| v as f32).collect(), [values.len()]),
            device,
        );
        let id = self.id;
        let summed = self.collective(what, move || all_reduce_sum(id, tensor))?;
        Ok(summed.into_data().iter::<f32>().map(f64::from).collect())
    }

    /// Sum every trainable parameter's gradient over all peers, with `extras` (loss, counts)
    /// riding along in the same single all-reduce. A parameter with no gradient on this peer
    /// (it had no examples) contributes zeros; frozen parameters take no part.
    pub fn sum_gradients<B: TrainBackend, M: Module<B>>(
        &mut self,
        model: &M,
        grads: GradientsParams,
        extras: &[f64],
        what: &str,
        device: &B::Device,
    ) -> Result<(GradientsParams, Vec<f64>)> {
        let mut flatten = Flatten::<B> { grads, parts: Vec::new(), shapes: Vec::new(), device: device.clone() };
        model.visit(&mut flatten);
        let Flatten { mut grads, mut parts, shapes, .. } = flatten;
        let extras_data = TensorData::new(extras.iter().map(|&v| v as f32).collect(), [extras.len()]);
        parts.push(Tensor::from_data(extras_data, device));
        // [Σ parameter sizes + extras]
        let flat = Tensor::cat(parts, 0);
        if !self.logged_size && self.rank == 0 {
            let floats = flat.dims()[0];
            let mib = format!("{:.1}", (floats * 4) as f64 / (1 << 20) as f64);
            tracing::info!(floats, mib, rank = self.rank, "each step all-reduces the gradients in one f32 tensor");
            self.logged_size = true;
        }
        let id = self.id;
        let summed = self.collective(what, move || all_reduce_sum(id, flat))?;
        let mut offset = 0;
        for (param, shape) in shapes {
            let n: usize = shape.iter().product();
            let grad = summed.clone().slice(offset..offset + n);
            offset += n;
            grads.register_dyn::<B::InnerBackend>(param, grad, &shape);
        }
        let extras = summed.slice(offset..offset + extras.len()).into_data().iter::<f32>().map(f64::from).collect();
        Ok((grads, extras))
    }

    /// Check that every peer trains the same thing: each contributes its fingerprints (spec,
    /// data, weights, where training stands); a peer whose differ from rank 0's is refused,
    /// by name, before any training. Each also tells the others its node's data address.
    pub fn agree<B: Backend>(
        &mut self,
        fingerprints: &[(&str, u64)],
        address: Option<SocketAddr>,
        device: &B::Device,
    ) -> Result<()> {
        let (ip, port) = match address {
            Some(SocketAddr::V4(a)) => (u32::from(*a.ip()) as u64, a.port() as u64),
            _ => (0, 0),
        };
        // The last value counts the peers that claim this rank: one each, unless two nodes were
        // given the same `distributed.rank`.
        let mine: Vec<u64> = fingerprints.iter().map(|(_, value)| *value).chain([ip << 16 | port, 1]).collect();
        // Each rank fills its own row with 16-bit pieces (exact in f32), so the sum hands every
        // peer all the rows.
        let width = mine.len() * 4;
        let mut rows = vec![0.0; self.world * width];
        for (i, value) in mine.iter().enumerate() {
            for piece in 0..4 {
                rows[self.rank * width + i * 4 + piece] = ((value >> (16 * piece)) & 0xFFFF) as f64;
            }
        }
        let all = self.sum::<B>(&rows, "comparing the peers' specs, data and weights", device)?;
        let value_of = |rank: usize, i: usize| -> u64 {
            (0..4).map(|piece| (all[rank * width + i * 4 + piece] as u64) << (16 * piece)).sum()
        };
        let address_of = |rank: usize| {
            let value = value_of(rank, fingerprints.len());
            let ip = std::net::Ipv4Addr::from((value >> 16) as u32);
            (value != 0).then(|| SocketAddr::from((ip, (value & 0xFFFF) as u16)))
        };
        let nodes = self.world / self.local_count;
        let claims: Vec<u64> =
            (0..nodes).map(|node| value_of(node * self.local_count, fingerprints.len() + 1)).collect();
        if let Some(twice) = claims.iter().position(|&claims| claims > 1) {
            let missing: Vec<usize> = (0..nodes).filter(|&node| claims[node] == 0).collect();
            bail!(
                "{} nodes joined as node {twice} and none as node {missing:?}: give each node its own distributed.rank, 0 to {}",
                claims[twice],
                nodes - 1
            );
        }
        self.nodes = (0..nodes).map(|node| address_of(node * self.local_count)).collect();
        for rank in 1..self.world {
            for (i, (name, _)) in fingerprints.iter().enumerate() {
                if value_of(rank, i) != value_of(0, i) {
                    bail!(
                        "rank {rank}'s {name} differs from rank 0's ({:016x} ≠ {:016x}): every node must run the same spec on the same inputs",
                        value_of(rank, i),
                        value_of(0, i)
                    );
                }
            }
        }
        Ok(())
    }

    /// Leave the collective; the run's other peers do the same.
    pub fn finish<B: Backend>(mut self) -> Result<()> {
        let id = self.id;
        self.collective("finishing", move || {
            burn_collective::finish_collective::<B>(id).map(|()| Tensor::<B, 1>::empty([0], &Default::default()))
        })?;
        Ok(())
    }

    /// Run one blocking burn-collective call on a helper thread and wait for it, giving up
    /// (with the peer to blame, where known) when another local peer has failed or the call
    /// has waited longer than the timeout.
    fn collective<B: Backend>(
        &mut self,
        what: &str,
        call: impl FnOnce() -> Result<Tensor<B, 1>, burn_collective::CollectiveError> + Send + 'static,
    ) -> Result<Tensor<B, 1>> {
        self.calls += 1;
        let local_index = self.rank - self.local.first_rank;
        self.local.reached[local_index].store(self.calls, Ordering::SeqCst);
        let (send, receive) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = send.send(call());
        });
        let started = Instant::now();
        loop {
            match receive.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(tensor)) => return Ok(tensor),
                Ok(Err(error)) => {
                    bail!("rank {}: {what}: {}{}", self.rank, explain(&error), self.lost_nodes())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("rank {}: {what}: the collective operation broke off{}", self.rank, self.lost_nodes())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some((rank, error)) = self.local.failed.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                bail!("rank {}: stopping, because peer rank {rank} failed: {error}", self.rank);
            }
            if started.elapsed() >= self.timeout {
                let behind: Vec<usize> = (self.local.reached.iter().enumerate())
                    .filter(|(_, reached)| reached.load(Ordering::SeqCst) < self.calls)
                    .map(|(i, _)| self.local.first_rank + i)
                    .collect();
                let who = match behind.as_slice() {
                    [] => "a peer on another node".to_string(),
                    [one] => format!("peer rank {one}"),
                    many => format!("peer ranks {many:?}"),
                };
                return Err(TimedOut(format!(
                    "rank {}: {who} did not reach collective call {} ({what}) within {:.0} s; it died or hangs{}",
                    self.rank,
                    self.calls,
                    self.timeout.as_secs_f64(),
                    self.lost_nodes()
                ))
                .into());
            }
        }
    }
}

/// A collective call that waited past the timeout for another peer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TimedOut(String);

/// What a failed burn-collective call means for a pipe run.
fn explain(error: &burn_collective::CollectiveError) -> String {
    use burn_collective::CollectiveError;
    // The orchestrator's error type is private to burn-collective: its variants go by name.
    let name = format!("{error:?}");
    if matches!(error, CollectiveError::RegisterParamsMismatch) || name == "Global(RegisterParamsMismatch)" {
        "the other nodes joined with another number of nodes or peers: every node must run the same spec \
         (distributed.nodes, and as many run.devices)"
            .into()
    } else if matches!(error, CollectiveError::MultipleRegister) || name == "Global(DoubleRegister)" {
        "this rank has joined already: two nodes were given the same distributed.rank".into()
    } else {
        format!("the collective operation failed: {name}")
    }
}

impl Peer {
    /// The other nodes, each named as gone (its data port refuses connections) or up; empty
    /// for a run on one node.
    fn lost_nodes(&self) -> String {
        let this = self.rank / self.local_count;
        let states: Vec<String> = (self.nodes.iter().enumerate())
            .filter(|&(node, _)| node != this)
            .map(|(node, address)| match address {
                Some(a) => match TcpStream::connect_timeout(a, Duration::from_secs(1)) {
                    Ok(_) => format!("node {node} ({a}) is up, so it hangs or is slow"),
                    Err(e) => format!("node {node} ({a}) is gone ({e})"),
                },
                None => format!("node {node}: address unknown"),
            })
            .collect();
        match states.is_empty() {
            true => String::new(),
            false => format!("; {}", states.join("; ")),
        }
    }
}

fn all_reduce_sum<B: Backend>(
    id: PeerId,
    tensor: Tensor<B, 1>,
) -> Result<Tensor<B, 1>, burn_collective::CollectiveError> {
    let summed = burn_collective::all_reduce::<B>(id, tensor.into_primitive().tensor(), ReduceOperation::Sum)?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)))
}

/// Collects trainable parameters' gradients, flattened, in the module's own order (the same on
/// every peer, unlike parameter ids, which differ between processes).
struct Flatten<B: TrainBackend> {
    grads: GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    shapes: Vec<(burn::module::ParamId, Vec<usize>)>,
    device: B::Device,
}

impl<B: TrainBackend> ModuleVisitor<B> for Flatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let shape = value.dims().to_vec();
        let n: usize = shape.iter().product();
        let grad = match self.grads.remove::<B::InnerBackend, D>(param.id) {
            Some(grad) => grad.reshape([n]),
            None => Tensor::zeros([n], &self.device),
        };
        self.parts.push(grad);
        self.shapes.push((param.id, shape));
    }
}

/// Registering a flat slice back as a gradient of the parameter's rank.
trait RegisterDyn {
    fn register_dyn<B: Backend>(&mut self, id: burn::module::ParamId, flat: Tensor<B, 1>, shape: &[usize]);
}

impl RegisterDyn for GradientsParams {
    fn register_dyn<B: Backend>(&mut self, id: burn::module::ParamId, flat: Tensor<B, 1>, shape: &[usize]) {
        match *shape {
            [a] => self.register(id, flat.reshape([a])),
            [a, b] => self.register(id, flat.reshape([a, b])),
            [a, b, c] => self.register(id, flat.reshape([a, b, c])),
            [a, b, c, d] => self.register(id, flat.reshape([a, b, c, d])),
            _ => unreachable!("GPT-2's parameters have one to four dimensions"),
        }
    }
}
