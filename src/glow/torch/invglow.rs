//! The parameters of an `invglow` Glow (the paper authors' `create_glow_model`) in either saved
//! form, and their mapping onto our [`GlowModel`].
//!
//! Their model is a graph of `Node`s named `m0-flow-i` (squeeze + K steps of scale i),
//! `m0-act-i` (exit ActNorm) and `m0-dist-i` (prior) for i = 0..L. Parameters are grouped per
//! node, keyed by their path inside the node's module (e.g. `sequential.1.sequential.0.loc`).
//!
//! - **Whole module**: nodes keep their successors in plain `next` lists, so the pickle is
//!   cyclic and writes most nodes first inside those lists. candle's reader copies memo entries
//!   (objects are memoised before their `BUILD`), so later references see unbuilt shells;
//!   every node, however, appears fully built exactly once, and its `tags['name']` names it —
//!   which is also how the authors' code finds its per-scale nodes.
//! - **State dict**: keys are `_modules` paths from the root (`prev.i.prev.0...module.<path>`),
//!   and a shared node appears under several keys (aliases of one storage). From root entry i
//!   (dist-i), n further `prev.0` hops reach act-i (n = 1), then flow-i (n = 4 below the last
//!   scale: select, chunk, flow; n = 2 at the last) and each earlier flow 3 hops later.
//!
//! Source: `../shared/fixtures/torch-glow/FORMAT.md` §2-§5.

use std::collections::BTreeMap;

use candle_core::pickle::Object;
use candle_core::{Device, Tensor};

use super::ImportError;
use super::checkpoint::{Checkpoint, TensorRef, int};
use crate::glow::config::{Dequantization, GlowConfig, PreprocessConfig, Prior, ResizeMode};
use crate::glow::file::GlowModel;

/// Parameters of one node, keyed by their path inside the node's module.
pub type NodeParams = BTreeMap<String, TensorRef>;

/// A module of a whole-module file: its class and simple attributes.
#[derive(Debug, Clone, Default)]
pub struct ModuleInfo {
    /// `module.Class`, e.g. `invglow.invertible.affine.AffineCoefs`.
    pub class: String,
    /// Attributes holding a str, int, float or bool, rendered as text.
    pub attrs: BTreeMap<String, String>,
}

/// What was found in a checkpoint.
#[derive(Debug, Clone)]
pub struct FoundParams {
    /// Which form the checkpoint was.
    pub form: super::CheckpointForm,
    /// Node name (`m0-flow-0`, ...) -> its parameters.
    pub nodes: BTreeMap<String, NodeParams>,
    /// `node/path` -> module info (whole-module files only; empty for state dicts).
    pub modules: BTreeMap<String, ModuleInfo>,
}

/// Finds the per-node parameters in an unpickled checkpoint object.
///
/// Errors: [`ImportError::Structure`] when the object is neither form of an `invglow` Glow.
pub fn find_parameters(obj: &Object) -> Result<FoundParams, ImportError> {
    match obj {
        Object::Dict(entries) => from_state_dict(entries),
        Object::Build { .. } => from_whole_module(obj),
        other => Err(ImportError::Structure(format!(
            "the checkpoint holds {}, neither a state dict nor a pickled module",
            describe(other)
        ))),
    }
}

fn describe(obj: &Object) -> String {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => format!("the class {module_name}.{class_name}"),
        Object::Reduce { callable, .. } => format!("a call of {}", describe(callable)),
        Object::List(_) => "a list".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::Unicode(_) => "a string".into(),
        Object::None => "None".into(),
        _ => "an unexpected object".into(),
    }
}

fn key_str(k: &Object) -> Option<&str> {
    match k {
        Object::Unicode(s) => Some(s),
        _ => None,
    }
}

fn dict_get<'a>(entries: &'a [(Object, Object)], key: &str) -> Option<&'a Object> {
    entries
        .iter()
        .find(|(k, _)| key_str(k) == Some(key))
        .map(|(_, v)| v)
}

/// (class, state) of a built object: `NEWOBJ(cls, ()) ... BUILD(state)`.
fn as_built(obj: &Object) -> Option<(String, &[(Object, Object)])> {
    let Object::Build { callable, args } = obj else {
        return None;
    };
    let Object::Reduce { callable: cls, .. } = callable.as_ref() else {
        return None;
    };
    let Object::Class {
        module_name,
        class_name,
    } = cls.as_ref()
    else {
        return None;
    };
    let Object::Dict(state) = args.as_ref() else {
        return None;
    };
    Some((format!("{module_name}.{class_name}"), state))
}

/// The class of an unbuilt shell (a memo copy of a module built elsewhere).
fn shell_class(obj: &Object) -> Option<String> {
    let Object::Reduce { callable, .. } = obj else {
        return None;
    };
    match callable.as_ref() {
        Object::Class {
            module_name,
            class_name,
        } => Some(format!("{module_name}.{class_name}")),
        _ => None,
    }
}

fn is_node_name(name: &str) -> bool {
    ["m0-flow-", "m0-act-", "m0-dist-"].iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|i| i.parse::<usize>().is_ok())
    })
}

fn from_whole_module(root: &Object) -> Result<FoundParams, ImportError> {
    let mut found = FoundParams {
        form: super::CheckpointForm::WholeModule,
        nodes: BTreeMap::new(),
        modules: BTreeMap::new(),
    };
    let mut todo = vec![root];
    // Depth-first over the whole object tree (explicit stack: the tree nests ~50 deep).
    while let Some(obj) = todo.pop() {
        if let Some((_, state)) = as_built(obj) {
            let name = match dict_get(state, "tags") {
                Some(Object::Dict(tags)) => match dict_get(tags, "name") {
                    Some(Object::Unicode(n)) if is_node_name(n) => Some(n.clone()),
                    _ => None,
                },
                _ => None,
            };
            if let Some(name) = name
                && !found.nodes.contains_key(&name)
            {
                let module = match dict_get(state, "_modules") {
                    Some(Object::Dict(m)) => dict_get(m, "module"),
                    _ => None,
                };
                let mut params = NodeParams::new();
                if let Some(module) = module {
                    collect_module(module, &name, "", &mut params, &mut found.modules)?;
                }
                found.nodes.insert(name, params);
            }
        }
        match obj {
            Object::Build { callable, args } | Object::Reduce { callable, args } => {
                todo.push(args);
                todo.push(callable);
            }
            Object::Tuple(v) | Object::List(v) => todo.extend(v.iter().rev()),
            Object::Dict(kv) => {
                for (k, v) in kv.iter().rev() {
                    todo.push(v);
                    todo.push(k);
                }
            }
            Object::PersistentLoad(inner) => todo.push(inner),
            _ => {}
        }
    }
    if found.nodes.is_empty() {
        let class = as_built(root).map(|(c, _)| c).unwrap_or_default();
        return Err(ImportError::Structure(format!(
            "a pickled module of class `{class}` with no nodes named m0-flow-i / m0-act-i / \
             m0-dist-i: not a Glow of the paper authors' code"
        )));
    }
    Ok(found)
}

/// Collects the tensors of `module` and its children under `path`.
fn collect_module(
    module: &Object,
    node: &str,
    path: &str,
    params: &mut NodeParams,
    modules: &mut BTreeMap<String, ModuleInfo>,
) -> Result<(), ImportError> {
    let join = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        }
    };
    let Some((class, state)) = as_built(module) else {
        if let Some(class) = shell_class(module) {
            modules.insert(
                format!("{node}/{path}"),
                ModuleInfo {
                    class,
                    ..Default::default()
                },
            );
        }
        return Ok(());
    };
    let mut info = ModuleInfo {
        class,
        ..Default::default()
    };
    for (k, v) in state {
        let Some(k) = key_str(k) else { continue };
        match (k, v) {
            ("_parameters" | "_buffers", Object::Dict(tensors)) => {
                for (name, t) in tensors {
                    let Some(name) = key_str(name) else { continue };
                    if matches!(t, Object::None) {
                        continue;
                    }
                    let t = TensorRef::from_object(t)?.ok_or_else(|| {
                        ImportError::Structure(format!(
                            "`{}` of node {node} is not a tensor",
                            join(name)
                        ))
                    })?;
                    params.insert(join(name), t);
                }
            }
            ("_modules", Object::Dict(children)) => {
                for (name, child) in children {
                    if let Some(name) = key_str(name) {
                        collect_module(child, node, &join(name), params, modules)?;
                    }
                }
            }
            (_, Object::Unicode(s)) => {
                info.attrs.insert(k.into(), s.clone());
            }
            (_, Object::Bool(b)) => {
                info.attrs.insert(k.into(), b.to_string());
            }
            (_, Object::Float(f)) => {
                info.attrs.insert(k.into(), f.to_string());
            }
            (_, Object::Int(_) | Object::Long(_)) => {
                info.attrs
                    .insert(k.into(), int(v).map(|i| i.to_string()).unwrap_or_default());
            }
            _ => {}
        }
    }
    modules.insert(format!("{node}/{path}"), info);
    Ok(())
}

fn from_state_dict(entries: &[(Object, Object)]) -> Result<FoundParams, ImportError> {
    let mut tensors = Vec::new();
    for (k, v) in entries {
        let Some(key) = key_str(k) else { continue };
        if let Some(t) = TensorRef::from_object(v)? {
            tensors.push((key.to_string(), t));
        }
    }
    if tensors.is_empty() {
        return Err(ImportError::Structure(
            "a dict without tensors: not a state dict".into(),
        ));
    }
    let parsed: Vec<(usize, usize, String, TensorRef)> = tensors
        .into_iter()
        .map(|(key, t)| {
            let (root, hops, rest) = parse_key(&key).ok_or_else(|| {
                ImportError::Structure(format!(
                    "state-dict key `{key}` is not a parameter of the authors' Glow graph \
                     (expected prev.<i>.[prev.0.]...module.<name>)"
                ))
            })?;
            Ok((root, hops, rest, t))
        })
        .collect::<Result<_, ImportError>>()?;
    let scales = parsed.iter().map(|p| p.0).max().unwrap_or(0) + 1;
    let mut found = FoundParams {
        form: super::CheckpointForm::StateDict,
        nodes: BTreeMap::new(),
        modules: BTreeMap::new(),
    };
    for (root, hops, rest, t) in parsed {
        let node = node_of(root, hops, scales).ok_or_else(|| {
            ImportError::Structure(format!(
                "state-dict key prev.{root} + {hops} x prev.0 ... {rest}: no node of a \
                 {scales}-scale Glow sits there"
            ))
        })?;
        let params = found.nodes.entry(node.clone()).or_default();
        match params.get(&rest) {
            None => {
                params.insert(rest, t);
            }
            Some(first) if *first == t => {}
            Some(_) => {
                return Err(ImportError::Structure(format!(
                    "`{rest}` of {node} appears under several keys with different tensors"
                )));
            }
        }
    }
    Ok(found)
}

/// `prev.i.(prev.0.)^n module.rest` -> (i, n, rest).
fn parse_key(key: &str) -> Option<(usize, usize, String)> {
    let mut s = key.strip_prefix("prev.")?;
    let dot = s.find('.')?;
    let root: usize = s[..dot].parse().ok()?;
    s = &s[dot + 1..];
    let mut hops = 0;
    while let Some(r) = s.strip_prefix("prev.0.") {
        hops += 1;
        s = r;
    }
    let rest = s.strip_prefix("module.")?;
    Some((root, hops, rest.to_string()))
}

/// The node reached from root entry `i` (dist-i) after `n` hops, in an L-scale graph.
fn node_of(i: usize, n: usize, scales: usize) -> Option<String> {
    match n {
        0 => return Some(format!("m0-dist-{i}")),
        1 => return Some(format!("m0-act-{i}")),
        _ => {}
    }
    let base = if i + 1 < scales { 4 } else { 2 };
    let back = n.checked_sub(base)?;
    (back % 3 == 0 && back / 3 <= i).then(|| format!("m0-flow-{}", i - back / 3))
}

/// Parameter names of one flow step under `sequential.<k>.sequential.`, and of the coupling
/// network's layers under `2.coef_extractor.module.`.
const STEP_KEYS: [&str; 19] = [
    "0.loc",
    "0.log_scale",
    "1.w_p",
    "1.w_l",
    "1.w_u",
    "1.w_s",
    "1.u_mask",
    "1.l_mask",
    "1.s_sign",
    "1.l_eye",
    "2.coef_extractor.module.0.conv.weight",
    "2.coef_extractor.module.0.actnorm.loc",
    "2.coef_extractor.module.0.actnorm.log_scale",
    "2.coef_extractor.module.2.conv.weight",
    "2.coef_extractor.module.2.actnorm.loc",
    "2.coef_extractor.module.2.actnorm.log_scale",
    "2.coef_extractor.module.4.conv.weight",
    "2.coef_extractor.module.4.conv.bias",
    "2.coef_extractor.module.4.logs",
];

fn unsupported(s: String) -> ImportError {
    ImportError::Unsupported(s)
}

fn structure(s: String) -> ImportError {
    ImportError::Structure(s)
}

fn node<'a>(found: &'a FoundParams, name: &str) -> Result<&'a NodeParams, ImportError> {
    found
        .nodes
        .get(name)
        .ok_or_else(|| structure(format!("node {name} is missing")))
}

fn get<'a>(p: &'a NodeParams, node: &str, key: &str) -> Result<&'a TensorRef, ImportError> {
    p.get(key)
        .ok_or_else(|| structure(format!("tensor `{key}` of {node} is missing")))
}

/// Refuses the variants of `create_glow_model` (and relatives) we cannot score, naming them.
fn check_step_variant(p: &NodeParams, node: &str, step: usize) -> Result<(), ImportError> {
    let s = format!("sequential.{step}.sequential.");
    let at = |k: &str| p.get(&format!("{s}{k}"));
    let where_ = format!("{node}, flow step {step}");
    let channels = at("0.loc")
        .and_then(|t| t.shape.get(1).copied())
        .unwrap_or(0);
    if at("1.indices").is_some() {
        return Err(unsupported(format!(
            "a shuffle permutation (buffer `indices`) in {where_}; only the LU-decomposed \
             invertible 1x1 convolution (flow_permutation='invconv', LU_decomposed=True) is \
             supported"
        )));
    }
    if at("1.weight").is_some() {
        return Err(unsupported(format!(
            "a 1x1 convolution without LU decomposition (parameter `weight`) in {where_}; only \
             LU_decomposed=True is supported"
        )));
    }
    if at("0.loc").is_none() {
        return Err(unsupported(format!(
            "a flow step without ActNorm, or with an identity/reverse permutation, in \
             {where_} (found {:?})",
            p.keys()
                .filter(|k| k.starts_with(&s))
                .map(|k| &k[s.len()..])
                .collect::<Vec<_>>()
        )));
    }
    if !p.keys().any(|k| k.starts_with(&format!("{s}1.w_"))) {
        return Err(unsupported(format!(
            "a flow step without LU 1x1 convolution parameters (an identity permutation?) in \
             {where_}"
        )));
    }
    if at("2.coef_extractor.module.0.weight").is_some() {
        return Err(unsupported(format!(
            "dense coupling networks (nn.Linear) in {where_}; only block_type='conv'"
        )));
    }
    if let Some(w) = at("2.coef_extractor.module.4.conv.weight")
        && w.shape.first() == Some(&(channels / 2))
    {
        return Err(unsupported(format!(
            "additive coupling in {where_} (its network outputs C/2 = {} channels; affine \
                 coupling outputs C = {channels})",
            channels / 2
        )));
    }
    for k in p.keys().filter(|k| k.starts_with(&s)) {
        if !STEP_KEYS.contains(&&k[s.len()..]) {
            return Err(structure(format!("unexpected tensor `{k}` in {node}")));
        }
    }
    Ok(())
}

/// Checks the classes and attributes recorded in a whole-module file (a state dict has none:
/// there the tensor names and shapes are all there is, and the attributes below are the ones
/// `create_glow_model` always sets).
fn check_modules(found: &FoundParams) -> Result<(), ImportError> {
    for (path, m) in &found.modules {
        let short = m.class.rsplit('.').next().unwrap_or("");
        let attr = |k: &str| m.attrs.get(k).map(String::as_str);
        let bad = |what: String| Err(unsupported(format!("{what} at {path}")));
        match short {
            "AdditiveCoefs" => return bad("additive coupling (AdditiveCoefs)".into()),
            "Shuffle" => return bad("a shuffle permutation (Shuffle)".into()),
            "ELU" => return bad("ELU activations in the coupling networks".into()),
            "InvPermute" if attr("use_lu") != Some("true") => {
                return bad("a 1x1 convolution without LU decomposition".into());
            }
            "AffineModifier"
                if attr("sigmoid_or_exp_scale") != Some("sigmoid")
                    || attr("add_first") != Some("true")
                    || !matches!(attr("eps"), Some("0" | "0.0")) =>
            {
                return bad(format!(
                    "an affine coupling with scale {:?}, add_first {:?}, eps {:?} (supported: \
                     sigmoid, true, 0)",
                    attr("sigmoid_or_exp_scale"),
                    attr("add_first"),
                    attr("eps")
                ));
            }
            "Conv2dZeros" if attr("logscale_factor") != Some("3") => {
                return bad(format!(
                    "an output convolution with logscale_factor {:?} (supported: 3)",
                    attr("logscale_factor")
                ));
            }
            "ActNorm" if attr("scale_fn").is_some_and(|f| f != "exp") => {
                return bad(format!("an ActNorm with scale_fn {:?}", attr("scale_fn")));
            }
            _ => {}
        }
        let is_exit = path.starts_with("m0-act-");
        if short == "ActNorm" {
            let eps: f64 = attr("eps").and_then(|e| e.parse().ok()).unwrap_or(f64::NAN);
            let want = if is_exit { 1e-8 } else { 0.0 };
            if eps != want {
                return bad(format!("an ActNorm with eps {eps} (supported: {want})"));
            }
        }
        let prior_class = if path.starts_with("m0-dist-") && path.ends_with("/dist") {
            Some("NClassIndependentDist")
        } else if path.starts_with("m0-dist-") && path.ends_with('/') {
            Some("Unlabeled")
        } else {
            None
        };
        if prior_class.is_some_and(|want| want != short) {
            return bad(format!("a prior of class {}", m.class));
        }
    }
    Ok(())
}

/// The architecture found, in our terms.
fn infer_config(found: &FoundParams, resize: ResizeMode) -> Result<GlowConfig, ImportError> {
    let scales = (0..)
        .take_while(|i| found.nodes.contains_key(&format!("m0-flow-{i}")))
        .count();
    if scales < 2 {
        return Err(structure(format!(
            "{scales} flow node(s) m0-flow-i found; a multi-scale Glow has at least 2"
        )));
    }
    let flow0 = node(found, "m0-flow-0")?;
    let steps = (1..)
        .take_while(|k| {
            flow0
                .keys()
                .any(|n| n.starts_with(&format!("sequential.{k}.sequential.")))
        })
        .count();
    let c0 = get(flow0, "m0-flow-0", "sequential.1.sequential.0.loc")?
        .shape
        .get(1)
        .copied()
        .unwrap_or(0);
    if c0 != 4 && c0 != 12 {
        return Err(unsupported(format!(
            "{} image channels (the first scale has {c0} channels after the squeeze); \
             supported: 1 or 3",
            c0 as f64 / 4.0
        )));
    }
    let hidden = get(
        flow0,
        "m0-flow-0",
        "sequential.1.sequential.2.coef_extractor.module.0.conv.weight",
    )?
    .shape
    .first()
    .copied()
    .unwrap_or(0);
    let exit0 = get(node(found, "m0-act-0")?, "m0-act-0", "sequential.1.loc")?;
    let d0 = exit0.numel();
    // D_0 = (C_0 / 2) (S / 2)^2.
    let side = ((2 * d0 / c0) as f64).sqrt().round() as usize * 2;
    let cfg = GlowConfig {
        in_channels: c0 / 4,
        image_size: side,
        scales,
        steps,
        hidden,
        preprocess: PreprocessConfig {
            resize,
            dequantization: Dequantization::BinCentre,
        },
        prior: Prior::DiagonalGaussian,
    };
    cfg.validate()
        .map_err(|e| structure(format!("the parameters imply an invalid model: {e}")))?;
    Ok(cfg)
}

/// Builds our model from the parameters found (see the module docs for the mapping).
///
/// Errors: [`ImportError::Unsupported`] for a variant we cannot score (named),
/// [`ImportError::Structure`] for missing or misshapen parameters.
pub fn build_model(
    ck: &Checkpoint,
    found: &FoundParams,
    resize: ResizeMode,
    device: &Device,
) -> Result<GlowModel, ImportError> {
    check_modules(found)?;
    for (name, params) in found
        .nodes
        .iter()
        .filter(|(n, _)| n.starts_with("m0-flow-"))
    {
        for step in (1..).take_while(|j| {
            params
                .keys()
                .any(|n| n.starts_with(&format!("sequential.{j}.sequential.")))
        }) {
            check_step_variant(params, name, step)?;
        }
    }
    let cfg = infer_config(found, resize)?;
    let model = GlowModel::new_random(&cfg, 0, device)?;
    let mut assigned = 0usize;
    let vars = model.varmap.data().lock().expect("varmap lock").clone();
    let mut set =
        |ours: String, node: &str, p: &NodeParams, key: &str| -> Result<(), ImportError> {
            let t = get(p, node, key)?;
            let var = vars
                .get(&ours)
                .ok_or_else(|| structure(format!("no parameter `{ours}` in the model")))?;
            if t.numel() != var.elem_count() {
                return Err(structure(format!(
                    "`{key}` of {node} has shape {:?}, the model's `{ours}` needs {:?}",
                    t.shape,
                    var.dims()
                )));
            }
            let values = ck.values_f32(t)?;
            let tensor = Tensor::from_vec(values, var.shape(), &Device::Cpu)
                .and_then(|x| x.to_device(device))
                .map_err(crate::glow::GlowError::from)?;
            var.set(&tensor).map_err(crate::glow::GlowError::from)?;
            assigned += 1;
            Ok(())
        };
    for k in 0..cfg.scales {
        let flow_name = format!("m0-flow-{k}");
        let flow = node(found, &flow_name)?;
        if let Some(extra) = flow
            .keys()
            .find(|n| !n.starts_with("sequential.") || n.starts_with("sequential.0."))
        {
            return Err(structure(format!(
                "unexpected tensor `{extra}` in {flow_name}"
            )));
        }
        let last_step = (1..)
            .take_while(|j| {
                flow.keys()
                    .any(|n| n.starts_with(&format!("sequential.{j}.sequential.")))
            })
            .count();
        if last_step != cfg.steps {
            return Err(unsupported(format!(
                "{last_step} flow steps in scale {k} but {} in scale 0; glowwatch needs the \
                 same K at every scale",
                cfg.steps
            )));
        }
        for j in 0..cfg.steps {
            let step = j + 1;
            check_lu_masks(ck, flow, &flow_name, step)?;
            let ours = |name: &str| format!("scale{k}.step{j}.{name}");
            let theirs = |name: &str| format!("sequential.{step}.sequential.{name}");
            let pairs = [
                ("actnorm.loc", "0.loc"),
                ("actnorm.logs", "0.log_scale"),
                ("invconv.perm", "1.w_p"),
                ("invconv.lower", "1.w_l"),
                ("invconv.upper", "1.w_u"),
                ("invconv.logw", "1.w_s"),
                ("invconv.sign", "1.s_sign"),
                (
                    "coupling.conv1.weight",
                    "2.coef_extractor.module.0.conv.weight",
                ),
                (
                    "coupling.norm1.loc",
                    "2.coef_extractor.module.0.actnorm.loc",
                ),
                (
                    "coupling.norm1.logs",
                    "2.coef_extractor.module.0.actnorm.log_scale",
                ),
                (
                    "coupling.conv2.weight",
                    "2.coef_extractor.module.2.conv.weight",
                ),
                (
                    "coupling.norm2.loc",
                    "2.coef_extractor.module.2.actnorm.loc",
                ),
                (
                    "coupling.norm2.logs",
                    "2.coef_extractor.module.2.actnorm.log_scale",
                ),
                (
                    "coupling.conv3.weight",
                    "2.coef_extractor.module.4.conv.weight",
                ),
                ("coupling.conv3.bias", "2.coef_extractor.module.4.conv.bias"),
                ("coupling.conv3.logs", "2.coef_extractor.module.4.logs"),
            ];
            for (o, t) in pairs {
                set(ours(o), &flow_name, flow, &theirs(t))?;
            }
        }
        let act_name = format!("m0-act-{k}");
        let act = node(found, &act_name)?;
        set(
            format!("scale{k}.exit.loc"),
            &act_name,
            act,
            "sequential.1.loc",
        )?;
        set(
            format!("scale{k}.exit.logs"),
            &act_name,
            act,
            "sequential.1.log_scale",
        )?;
        let dist_name = format!("m0-dist-{k}");
        let dist = node(found, &dist_name)?;
        let means = get(dist, &dist_name, "dist.class_means")?;
        if means.shape.len() == 2 && means.shape[0] != 1 {
            return Err(unsupported(format!(
                "a class-conditional prior with {} classes (`dist.class_means` of {dist_name} \
                 has shape {:?}); only the one-class prior of unconditional models",
                means.shape[0], means.shape
            )));
        }
        set(
            format!("scale{k}.exit.prior_mean"),
            &dist_name,
            dist,
            "dist.class_means",
        )?;
        set(
            format!("scale{k}.exit.prior_logstd"),
            &dist_name,
            dist,
            "dist.class_log_stds",
        )?;
    }
    if assigned != vars.len() {
        return Err(structure(format!(
            "{assigned} of the model's {} parameters were found",
            vars.len()
        )));
    }
    Ok(model)
}

/// The LU masks and identity must be the standard ones our 1x1 convolution hard-codes.
fn check_lu_masks(
    ck: &Checkpoint,
    flow: &NodeParams,
    node: &str,
    step: usize,
) -> Result<(), ImportError> {
    let key = |k: &str| format!("sequential.{step}.sequential.1.{k}");
    let u = ck.values_f32(get(flow, node, &key("u_mask"))?)?;
    let l = ck.values_f32(get(flow, node, &key("l_mask"))?)?;
    let eye = ck.values_f32(get(flow, node, &key("l_eye"))?)?;
    let c = (u.len() as f64).sqrt() as usize;
    let ok = c * c == u.len()
        && l.len() == u.len()
        && eye.len() == u.len()
        && (0..c * c).all(|idx| {
            let (i, j) = (idx / c, idx % c);
            u[idx] == f32::from(j > i)
                && l[idx] == f32::from(i > j)
                && eye[idx] == f32::from(i == j)
        });
    if ok {
        Ok(())
    } else {
        Err(unsupported(format!(
            "non-standard LU masks in {node}, flow step {step} (u_mask must be the strict upper \
             triangle of ones, l_mask its transpose, l_eye the identity)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dict_keys_map_to_their_nodes() {
        // The canonical prefixes and aliases of FORMAT.md §4 (L = 3).
        let cases = [
            ("prev.0.prev.0.prev.0.prev.0.prev.0.module.x", "m0-flow-0"),
            ("prev.0.prev.0.module.x", "m0-act-0"),
            ("prev.0.module.x", "m0-dist-0"),
            ("prev.1.prev.0.prev.0.prev.0.prev.0.module.x", "m0-flow-1"),
            (
                "prev.1.prev.0.prev.0.prev.0.prev.0.prev.0.prev.0.prev.0.module.x",
                "m0-flow-0",
            ),
            ("prev.2.prev.0.prev.0.module.x", "m0-flow-2"),
            (
                "prev.2.prev.0.prev.0.prev.0.prev.0.prev.0.module.x",
                "m0-flow-1",
            ),
            (
                "prev.2.prev.0.prev.0.prev.0.prev.0.prev.0.prev.0.prev.0.prev.0.module.x",
                "m0-flow-0",
            ),
            ("prev.2.prev.0.module.x", "m0-act-2"),
        ];
        for (key, want) in cases {
            let (i, n, rest) = parse_key(key).unwrap();
            assert_eq!(rest, "x");
            assert_eq!(node_of(i, n, 3).as_deref(), Some(want), "{key}");
        }
        // A chunk or select node holds no parameters: nothing maps there.
        assert_eq!(node_of(0, 2, 3), None);
        assert_eq!(node_of(0, 3, 3), None);
        assert!(parse_key("module.x").is_none());
        assert!(parse_key("prev.a.module.x").is_none());
    }
}
