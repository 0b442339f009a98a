//! Chains the stages for the CLI and tests: source file -> checked, optimised, scheduled.

use std::path::{Path, PathBuf};

use crate::diag::{Diagnostic, Diagnostics};
use crate::graph::Graph;
use crate::io::ModelIndex;
use crate::ops::Compute;
use crate::plan::{Limits, Plan};
use crate::sema::{hir, CheckOptions};
use crate::source::{SourceId, SourceMap};
use crate::syntax::ast;

/// Everything `mergec check` computes; `mergec run` executes `plan`.
#[derive(Debug)]
pub struct Compiled {
    pub ast: ast::Script,
    pub program: hir::Program,
    /// The graph as lowered, before optimisation.
    pub lowered: Graph,
    /// The optimised graph the plan is made from.
    pub graph: Graph,
    pub plan: Plan,
    pub warnings: Diagnostics,
}

/// A script loaded from disk (or given as text) with the folder its relative paths use.
pub struct Script {
    pub sources: SourceMap,
    pub id: SourceId,
    pub base_dir: PathBuf,
    /// The mergekit YAML the script was translated from, if any (written beside each
    /// output as mergekit_config.yml, so the hub's merge tooling recognises the model).
    pub mergekit_config: Option<String>,
    /// `--compute`: the compute dtype of every save, over the script's own choice.
    pub compute: Option<Compute>,
}

impl Script {
    pub fn from_file(path: &Path) -> std::io::Result<Script> {
        let text = std::fs::read_to_string(path)?;
        let base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Script::from_text(&path.display().to_string(), text, base_dir))
    }

    pub fn from_text(name: &str, text: String, base_dir: PathBuf) -> Script {
        let mut sources = SourceMap::new();
        let id = sources.add(name, None, text);
        Script {
            sources,
            id,
            base_dir,
            mergekit_config: None,
            compute: None,
        }
    }

    pub fn text(&self) -> &str {
        &self.sources.get(self.id).text
    }
}

/// parse -> load headers -> check -> lower -> optimize -> schedule (+ plan check).
pub fn compile(script: &Script, force: bool, limits: &Limits) -> Result<Compiled, Diagnostics> {
    let ast = crate::syntax::parse(&script.sources, script.id)?;
    let mut index = ModelIndex::load(crate::sema::model_references(&ast), &script.base_dir);
    index.load_adapters(crate::sema::adapter_references(&ast), &script.base_dir);
    let options = CheckOptions {
        base_dir: script.base_dir.clone(),
        force,
        compute: script.compute,
    };
    let mut checked = crate::sema::check(&ast, script.text(), &index, &options)?;
    checked.program.mergekit_config = script.mergekit_config.clone();
    let graph = crate::graph::lower(&checked.program);
    let internal = |d: Box<Diagnostic>| Diagnostics::from(*d);
    crate::graph::verify(&graph).map_err(internal)?;
    let (optimised, _) = crate::opt::optimize(graph.clone()).map_err(internal)?;
    let plan = crate::plan::schedule(&optimised, &checked.program, limits, force)?;
    Ok(Compiled {
        ast,
        program: checked.program,
        lowered: graph,
        graph: optimised,
        plan,
        warnings: checked.warnings,
    })
}

/// A stage whose output `mergec debug` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Ast,
    Hir,
    /// The graph as lowered.
    Graph,
    /// The graph after optimisation.
    Opt,
    Plan,
    /// The WGSL of every generated element-wise kernel of the plan.
    Wgsl,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Ast,
        Stage::Hir,
        Stage::Graph,
        Stage::Opt,
        Stage::Plan,
        Stage::Wgsl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Ast => "ast",
            Stage::Hir => "hir",
            Stage::Graph => "graph",
            Stage::Opt => "opt",
            Stage::Plan => "plan",
            Stage::Wgsl => "wgsl",
        }
    }
}

/// The stable text form of one stage's output: what `mergec debug STAGE` prints and the
/// stage snapshots record.
pub fn dump(compiled: &Compiled, stage: Stage) -> String {
    match stage {
        Stage::Ast => format!("{:#?}\n", compiled.ast),
        Stage::Hir => hir::dump(&compiled.program),
        Stage::Graph => crate::graph::dump(&compiled.lowered),
        Stage::Opt => crate::graph::dump(&compiled.graph),
        Stage::Plan => crate::plan::dump(&compiled.plan),
        Stage::Wgsl => crate::kernels::dump(&compiled.plan),
    }
}
