//! The report's lineage graph: for every image live or promoted in a stage, commit → recipe key → image, parent
//! image → image, image → stage; laid out and drawn as SVG by layout-rs, with no Graphviz to install.

use std::collections::BTreeMap;

use layout::backends::svg::SVGWriter;
use layout::core::base::Orientation;
use layout::core::color::Color;
use layout::core::geometry::Point;
use layout::core::style::StyleAttr;
use layout::std_shapes::shapes::{Arrow, Element, ShapeKind};
use layout::topo::layout::VisualGraph;

use super::StageReport;
use crate::digest::Digest;
use crate::ledger::View;

const FONT: usize = 13;
/// The page's own font for the labels; layout-rs writes `Times, serif`.
const FONT_FAMILY: &str = "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace";

#[derive(Clone, Copy)]
enum Kind {
    Commit,
    Key,
    Image { live: bool, revoked: bool },
    Stage,
}

fn look(kind: Kind) -> StyleAttr {
    let (line, fill, rounded) = match kind {
        Kind::Commit => ("#6b7280", "#f3f4f6", 0),
        Kind::Key => ("#6b7280", "#ffffff", 0),
        Kind::Image { revoked: true, .. } => ("#b91c1c", "#fee2e2", 4),
        Kind::Image { live: true, .. } => ("#15803d", "#dcfce7", 4),
        Kind::Image { .. } => ("#1d4ed8", "#dbeafe", 4),
        Kind::Stage => ("#7c3aed", "#ede9fe", 14),
    };
    StyleAttr::new(Color::fast(line), 1, Some(Color::fast(fill)), rounded, FONT)
}

/// A box just large enough for `label` in the monospace font (layout-rs would size it for a wider one).
fn node(label: &str, kind: Kind) -> Element {
    let columns = label.lines().map(|l| l.chars().count()).max().unwrap_or(1).max(1) as f64;
    let lines = label.lines().count().max(1) as f64;
    let size = Point::new(columns * FONT as f64 * 0.62 + 20.0, lines * FONT as f64 * 1.25 + 14.0);
    Element::create(ShapeKind::new_box(label), look(kind), Orientation::LeftToRight, size)
}

fn edge(label: &str) -> Arrow {
    let mut arrow = Arrow::simple(label);
    arrow.look = StyleAttr::new(Color::fast("#6b7280"), 1, None, 0, FONT - 2);
    arrow
}

/// The SVG, or none when no stage has an image live or promoted.
pub fn lineage_svg(view: &View, stages: &[StageReport]) -> Option<String> {
    // image → the stages it is live or promoted in, and how.
    let mut reached: BTreeMap<Digest, Vec<(String, &'static str)>> = BTreeMap::new();
    for stage in stages {
        let live = stage.live.as_ref().map(|l| l.digest);
        let promoted = stage.promoted.as_ref().map(|p| p.digest);
        match (live, promoted) {
            (Some(l), Some(p)) if l == p => reached.entry(l).or_default().push((stage.name.clone(), "live")),
            (l, p) => {
                if let Some(l) = l {
                    reached.entry(l).or_default().push((stage.name.clone(), "live"));
                }
                if let Some(p) = p {
                    reached.entry(p).or_default().push((stage.name.clone(), "promoted"));
                }
            }
        }
    }
    if reached.is_empty() {
        return None;
    }
    let live: Vec<Digest> = stages.iter().filter_map(|s| s.live.as_ref().map(|l| l.digest)).collect();

    let mut graph = VisualGraph::new(Orientation::LeftToRight);
    let mut images = BTreeMap::new();
    let mut commits = BTreeMap::new();
    // Images in the order they are drawn: each stage image's ancestors first, so parents sit to the left.
    let mut order: Vec<Digest> = Vec::new();
    for digest in reached.keys() {
        for d in view.ancestors(digest).into_iter().rev().chain(std::iter::once(*digest)) {
            if !order.contains(&d) {
                order.push(d);
            }
        }
    }
    for digest in &order {
        let Some(record) = view.image(digest) else { continue };
        let kind = Kind::Image { live: live.contains(digest), revoked: view.revocation(digest).is_some() };
        let image = graph.add_node(node(&format!("{}\n{}", record.recipe, digest.short()), kind));
        images.insert(*digest, image);
        let commit_label = match &record.commit {
            Some(c) => format!("commit\n{}{}", &c[..c.len().min(12)], if record.dirty { " (dirty)" } else { "" }),
            None => "no commit\nrecorded".to_string(),
        };
        let commit =
            *commits.entry(commit_label.clone()).or_insert_with(|| graph.add_node(node(&commit_label, Kind::Commit)));
        let key = graph.add_node(node(&format!("recipe key\n{}", record.recipe_key.short()), Kind::Key));
        graph.add_edge(edge(""), commit, key);
        graph.add_edge(edge(""), key, image);
    }
    for digest in &order {
        let (Some(record), Some(child)) = (view.image(digest), images.get(digest)) else { continue };
        if let Some(parent) = record.parent.and_then(|p| images.get(&p)) {
            graph.add_edge(edge("parent of"), *parent, *child);
        }
    }
    if images.is_empty() {
        // Stage digests this ledger has no bake record of: nothing to draw a lineage from.
        return None;
    }
    let mut stage_nodes = BTreeMap::new();
    for stage in stages {
        if reached.values().flatten().any(|(s, _)| *s == stage.name) {
            stage_nodes
                .insert(stage.name.clone(), graph.add_node(node(&format!("stage\n{}", stage.name), Kind::Stage)));
        }
    }
    for (digest, places) in &reached {
        let Some(image) = images.get(digest) else { continue };
        for (stage, how) in places {
            if let Some(stage) = stage_nodes.get(stage) {
                graph.add_edge(edge(how), *image, *stage);
            }
        }
    }

    let mut svg = SVGWriter::new();
    graph.do_it(false, false, false, &mut svg);
    // layout-rs sizes the canvas generously (it counts label length into the height too); the nodes' extent,
    // edge labels included, is the drawing's real size.
    let (mut width, mut height) = (0.0f64, 0.0f64);
    for handle in graph.iter_nodes() {
        let (_, bottom_right) = graph.pos(handle).bbox(false);
        width = width.max(bottom_right.x);
        height = height.max(bottom_right.y);
    }
    let (width, height) = ((width + 12.0).ceil(), (height + 12.0).ceil());
    let drawn = svg.finalize();
    // Inline in HTML: no XML declaration, its own opening tag, and the page's font.
    let body = drawn.find("<svg").and_then(|at| Some(&drawn[at + drawn[at..].find('>')? + 1..]))?;
    let open = format!(
        "<svg class=\"lineage\" role=\"img\" aria-label=\"lineage graph\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    Some(open + &body.replace("font-family: Times, serif", &format!("font-family: {FONT_FAMILY}")))
}
