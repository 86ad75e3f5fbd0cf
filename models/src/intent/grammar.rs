//! Context grammars in Picovoice Rhino's YAML format.
//!
//! ```yaml
//! context:
//!   expressions:
//!     changeColor:
//!       - "[turn, make] (all) the $location:location lights $color:color"
//!   slots:
//!     location: ["kitchen", "living room", "bedroom"]
//!     color: ["red", "green", "blue"]
//!   macros:
//!     polite: ["please", "would you"]
//! ```
//!
//! In an expression, `[a, b]` is a choice, `(a)` or `(a, b)` an optional
//! part, `$type:name` a slot filled from the type's phrases and `@macro` one
//! of the macro's phrases. Anything else is words. A grammar can expand to
//! millions of sentences, so it is only ever sampled ([`Sampler`]) and
//! matched ([`Grammar::parse_text`]), never enumerated.
//!
//! Every error names the line and column in the YAML file.

use std::collections::BTreeMap;
use std::fmt;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A grammar error, at a 1-based line and column of the YAML text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrammarError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for GrammarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.col, self.message
        )
    }
}

impl std::error::Error for GrammarError {}

/// A position in the YAML text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    col: usize,
}

impl Pos {
    fn of(m: &Marker) -> Pos {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }

    fn error(self, message: impl Into<String>) -> GrammarError {
        GrammarError {
            line: self.line,
            col: self.col,
            message: message.into(),
        }
    }
}

/// One part of an expression.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Word(String),
    Seq(Vec<Node>),
    /// Exactly one of the alternatives.
    Choice(Vec<Node>),
    /// Nothing, or one of the alternatives.
    Optional(Vec<Node>),
    /// A slot: index into [`Grammar::slots`].
    Slot(usize),
}

/// A slot of the grammar: a name used in expressions, with its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The name the intent reports it under (`location` in `$room:location`).
    pub name: String,
    /// The slot type: the phrase list it takes values from.
    pub ty: String,
    /// The type's phrases, exactly as written in the grammar.
    pub values: Vec<String>,
}

/// One intent and its expressions.
#[derive(Debug, Clone, PartialEq)]
pub struct Intent {
    pub name: String,
    /// Indices into [`Grammar::slots`] of every slot an expression of this
    /// intent may fill, in order of first appearance.
    pub slots: Vec<usize>,
    expressions: Vec<Node>,
}

/// A parsed context.
#[derive(Debug, Clone, PartialEq)]
pub struct Grammar {
    pub intents: Vec<Intent>,
    /// Every distinct (name, type) pair used by an expression.
    pub slots: Vec<Slot>,
}

/// One sampled sentence with what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Utterance {
    pub text: String,
    /// Index into [`Grammar::intents`].
    pub intent: usize,
    /// (index into [`Grammar::slots`], index into its values).
    pub slots: Vec<(usize, usize)>,
}

/// What the test's hold-out ([`Grammar::hold_out`]) keeps in training:
/// every part of a held-out sentence must keep at least half of the
/// distinct sentences that say it. A model records the rule its test was
/// held out by, so that it is measured again on the same sentences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldOut {
    /// The parts are the words and the slot values (the rule of the
    /// models trained before the word-pair rule). A phrasing of two
    /// sentences, such as "turn it up" and "turn it down", can then be
    /// held out whole: training hears every word of it, never the phrasing.
    Words,
    /// Words, slot values and pairs of neighbouring words
    /// ([`Grammar::word_pairs`]): a test sentence is a new combination of
    /// phrasings training spoke, as a user's new sentence is.
    #[default]
    WordPairs,
}

/// A YAML value with the position where it starts.
#[derive(Debug)]
enum Yaml {
    Scalar {
        text: String,
        pos: Pos,
        quoted: bool,
    },
    Seq(Vec<Yaml>, Pos),
    Map(Vec<(String, Pos, Yaml)>, Pos),
}

impl Yaml {
    fn pos(&self) -> Pos {
        match self {
            Yaml::Scalar { pos, .. } | Yaml::Seq(_, pos) | Yaml::Map(_, pos) => *pos,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Yaml::Scalar { .. } => "a single value",
            Yaml::Seq(..) => "a list",
            Yaml::Map(..) => "a mapping",
        }
    }
}

fn read_yaml(text: &str) -> Result<Yaml, GrammarError> {
    let mut parser = Parser::new_from_str(text);
    let mut next = move || -> Result<(Event, Pos), GrammarError> {
        parser
            .next_token()
            .map(|(e, m)| (e, Pos::of(&m)))
            .map_err(|e| Pos::of(e.marker()).error(format!("not valid YAML: {}", e.info())))
    };
    fn value(
        first: (Event, Pos),
        next: &mut dyn FnMut() -> Result<(Event, Pos), GrammarError>,
        depth: usize,
    ) -> Result<Yaml, GrammarError> {
        let (event, pos) = first;
        if depth > 16 {
            return Err(pos.error("the YAML is nested too deeply for a context"));
        }
        match event {
            Event::Scalar(text, style, ..) => Ok(Yaml::Scalar {
                text,
                pos,
                quoted: matches!(
                    style,
                    TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted
                ),
            }),
            Event::SequenceStart(..) => {
                let mut items = Vec::new();
                loop {
                    let ev = next()?;
                    if ev.0 == Event::SequenceEnd {
                        return Ok(Yaml::Seq(items, pos));
                    }
                    items.push(value(ev, next, depth + 1)?);
                }
            }
            Event::MappingStart(..) => {
                let mut entries: Vec<(String, Pos, Yaml)> = Vec::new();
                loop {
                    let ev = next()?;
                    if ev.0 == Event::MappingEnd {
                        return Ok(Yaml::Map(entries, pos));
                    }
                    let key_pos = ev.1;
                    let key = match value(ev, next, depth + 1)? {
                        Yaml::Scalar { text, .. } => text,
                        other => return Err(other.pos().error("a key must be a plain name")),
                    };
                    if entries.iter().any(|(k, ..)| *k == key) {
                        return Err(key_pos.error(format!("`{key}` is defined twice")));
                    }
                    let v = value(next()?, next, depth + 1)?;
                    entries.push((key, key_pos, v));
                }
            }
            Event::Alias(_) => Err(pos.error("YAML aliases are not supported in a context")),
            _ => Err(pos.error("unexpected YAML structure")),
        }
    }
    loop {
        let (event, pos) = next()?;
        match event {
            Event::StreamStart | Event::DocumentStart => continue,
            Event::StreamEnd => return Err(pos.error("the file is empty")),
            e => return value((e, pos), &mut next, 0),
        }
    }
}

fn map_of<'y>(y: &'y Yaml, what: &str) -> Result<&'y [(String, Pos, Yaml)], GrammarError> {
    match y {
        Yaml::Map(entries, _) => Ok(entries),
        other => Err(other
            .pos()
            .error(format!("{what} must be a mapping, found {}", other.kind()))),
    }
}

/// A list of phrases: each with the position of its first character.
fn phrases_of(y: &Yaml, what: &str) -> Result<Vec<(String, Pos)>, GrammarError> {
    let Yaml::Seq(items, pos) = y else {
        return Err(y.pos().error(format!(
            "{what} must be a list of phrases, found {}",
            y.kind()
        )));
    };
    if items.is_empty() {
        return Err(pos.error(format!("{what} is an empty list")));
    }
    items
        .iter()
        .map(|item| match item {
            Yaml::Scalar { text, pos, quoted } => {
                let start = Pos {
                    line: pos.line,
                    col: pos.col + usize::from(*quoted),
                };
                Ok((text.clone(), start))
            }
            other => Err(other
                .pos()
                .error(format!("{what} must hold phrases, found {}", other.kind()))),
        })
        .collect()
}

/// Tokens of one expression.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Open(char),
    Close(char),
    Comma,
    Slot { ty: String, name: String },
    Macro(String),
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '.' || c == '-'
}

fn tokenize(text: &str, start: Pos) -> Result<Vec<(Tok, Pos)>, GrammarError> {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| Pos {
        line: start.line,
        col: start.col + i,
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '[' | '(' => {
                out.push((Tok::Open(c), at(i)));
                i += 1;
            }
            ']' | ')' => {
                out.push((Tok::Close(c), at(i)));
                i += 1;
            }
            ',' => {
                out.push((Tok::Comma, at(i)));
                i += 1;
            }
            '$' => {
                let begin = i;
                i += 1;
                let ty = read_name(&chars, &mut i);
                if ty.is_empty() {
                    return Err(at(begin)
                        .error("`$` must be followed by a slot type, as in `$color:color`"));
                }
                if chars.get(i) != Some(&':') {
                    return Err(
                        at(begin).error(format!("slot `${ty}` has no name: write `${ty}:name`"))
                    );
                }
                i += 1;
                let name = read_name(&chars, &mut i);
                if name.is_empty() {
                    return Err(at(begin).error(format!(
                        "slot `${ty}:` has an empty name: write `${ty}:name`"
                    )));
                }
                out.push((Tok::Slot { ty, name }, at(begin)));
            }
            '@' => {
                let begin = i;
                i += 1;
                let name = read_name(&chars, &mut i);
                if name.is_empty() {
                    return Err(at(begin).error("`@` must be followed by a macro name"));
                }
                out.push((Tok::Macro(name), at(begin)));
            }
            _ => {
                let begin = i;
                while i < chars.len()
                    && !chars[i].is_whitespace()
                    && !matches!(chars[i], '[' | ']' | '(' | ')' | ',' | '$' | '@')
                {
                    i += 1;
                }
                let word: String = chars[begin..i].iter().collect();
                out.push((Tok::Word(word), at(begin)));
            }
        }
    }
    Ok(out)
}

/// What an expression may refer to while it is built.
struct Scope<'a> {
    slot_types: &'a BTreeMap<String, (Vec<String>, Pos)>,
    macros: &'a BTreeMap<String, Node>,
    slots: &'a mut Vec<Slot>,
    /// Slot names already used in the current expression.
    used: Vec<String>,
    /// Whether slots are allowed (not inside macros).
    allow_slots: bool,
}

/// Recursive descent over tokens: seq := item*, item := word | slot | macro
/// | '[' seq (',' seq)* ']' | '(' seq (',' seq)* ')'.
fn parse_seq(
    toks: &[(Tok, Pos)],
    i: &mut usize,
    scope: &mut Scope<'_>,
    closer: Option<(char, Pos)>,
) -> Result<Node, GrammarError> {
    let mut items = Vec::new();
    while let Some((tok, pos)) = toks.get(*i) {
        match tok {
            Tok::Comma | Tok::Close(_) => {
                if closer.is_none() {
                    return Err(match tok {
                        Tok::Comma => pos.error(
                            "a comma outside `[...]` or `(...)`: choices are written `[a, b]`",
                        ),
                        _ => pos.error("this bracket closes nothing"),
                    });
                }
                break;
            }
            Tok::Word(w) => {
                items.push(Node::Word(w.clone()));
                *i += 1;
            }
            Tok::Slot { ty, name } => {
                if !scope.allow_slots {
                    return Err(pos.error("a macro cannot hold slots"));
                }
                let Some((values, _)) = scope.slot_types.get(ty) else {
                    let known: Vec<&str> = scope.slot_types.keys().map(String::as_str).collect();
                    let hint = if ty.starts_with("pv.") {
                        " (Rhino's built-in `pv.` slots are not supported: list the phrases under `slots:`)"
                            .to_string()
                    } else if known.is_empty() {
                        " (the context defines no slots)".to_string()
                    } else {
                        format!(" (defined: {})", known.join(", "))
                    };
                    return Err(pos.error(format!("unknown slot type `{ty}`{hint}")));
                };
                if scope.used.contains(name) {
                    return Err(pos.error(format!(
                        "slot name `{name}` is used twice in one expression"
                    )));
                }
                scope.used.push(name.clone());
                let ix = match scope
                    .slots
                    .iter()
                    .position(|s| s.name == *name && s.ty == *ty)
                {
                    Some(ix) => ix,
                    None => {
                        scope.slots.push(Slot {
                            name: name.clone(),
                            ty: ty.clone(),
                            values: values.clone(),
                        });
                        scope.slots.len() - 1
                    }
                };
                items.push(Node::Slot(ix));
                *i += 1;
            }
            Tok::Macro(name) => {
                let Some(node) = scope.macros.get(name) else {
                    return Err(pos.error(format!("unknown macro `@{name}`")));
                };
                items.push(node.clone());
                *i += 1;
            }
            Tok::Open(open) => {
                let open_pos = *pos;
                let want = if *open == '[' { ']' } else { ')' };
                *i += 1;
                let mut alternatives = Vec::new();
                loop {
                    let alt = parse_seq(toks, i, scope, Some((want, open_pos)))?;
                    let Some((tok, pos)) = toks.get(*i) else {
                        return Err(open_pos.error(format!("`{open}` is never closed")));
                    };
                    if matches!(alt, Node::Seq(ref v) if v.is_empty()) {
                        return Err(pos.error(format!("an empty alternative in `{open}...{want}`")));
                    }
                    alternatives.push(alt);
                    match tok {
                        Tok::Comma => *i += 1,
                        Tok::Close(c) if *c == want => {
                            *i += 1;
                            break;
                        }
                        Tok::Close(c) => {
                            return Err(pos.error(format!(
                                "`{c}` closes the `{open}` opened at column {}; expected `{want}`",
                                open_pos.col
                            )));
                        }
                        _ => unreachable!("parse_seq stops only at a comma or a bracket"),
                    }
                }
                items.push(if *open == '[' {
                    Node::Choice(alternatives)
                } else {
                    Node::Optional(alternatives)
                });
            }
        }
    }
    if closer.is_none() && *i < toks.len() {
        unreachable!("the top level consumes every token");
    }
    Ok(Node::Seq(items))
}

fn parse_expression(text: &str, pos: Pos, scope: &mut Scope<'_>) -> Result<Node, GrammarError> {
    let toks = tokenize(text, pos)?;
    if toks.is_empty() {
        return Err(pos.error("an empty expression"));
    }
    scope.used.clear();
    let mut i = 0;
    let node = parse_seq(&toks, &mut i, scope, None)?;
    if !node.has_words() {
        return Err(pos.error("an expression must be able to say something"));
    }
    Ok(node)
}

/// Parses each phrase of an intent (slots allowed) or a macro (not).
fn parse_phrases(
    phrases: &[(String, Pos)],
    slot_types: &BTreeMap<String, (Vec<String>, Pos)>,
    macros: &BTreeMap<String, Node>,
    slots: &mut Vec<Slot>,
    allow_slots: bool,
) -> Result<Vec<Node>, GrammarError> {
    let mut scope = Scope {
        slot_types,
        macros,
        slots,
        used: Vec::new(),
        allow_slots,
    };
    phrases
        .iter()
        .map(|(p, pos)| parse_expression(p, *pos, &mut scope))
        .collect()
}

impl Node {
    /// Whether every way through this node says at least one word... or any
    /// way says some: an expression that can be empty is refused.
    fn has_words(&self) -> bool {
        self.min_words() > 0
    }

    fn min_words(&self) -> usize {
        match self {
            Node::Word(_) | Node::Slot(_) => 1,
            Node::Seq(v) => v.iter().map(Node::min_words).sum(),
            Node::Choice(v) => v.iter().map(Node::min_words).min().unwrap_or(0),
            Node::Optional(_) => 0,
        }
    }

    fn collect_slots(&self, out: &mut Vec<usize>) {
        match self {
            Node::Slot(ix) => {
                if !out.contains(ix) {
                    out.push(*ix);
                }
            }
            Node::Seq(v) | Node::Choice(v) | Node::Optional(v) => {
                v.iter().for_each(|n| n.collect_slots(out))
            }
            Node::Word(_) => {}
        }
    }
}

impl Grammar {
    /// Parses a context in Rhino's YAML format.
    pub fn parse(text: &str) -> Result<Grammar, GrammarError> {
        let root = read_yaml(text)?;
        let top = map_of(&root, "the file")?;
        let Some((_, _, context)) = top.iter().find(|(k, ..)| k == "context") else {
            return Err(root.pos().error("the file must start with `context:`"));
        };
        if let Some((k, p, _)) = top.iter().find(|(k, ..)| k != "context") {
            return Err(p.error(format!("unknown top-level key `{k}` (expected `context`)")));
        }
        let sections = map_of(context, "`context`")?;
        let mut expressions = None;
        let mut slot_section = None;
        let mut macro_section = None;
        for (key, pos, value) in sections {
            match key.as_str() {
                "expressions" => expressions = Some(value),
                "slots" => slot_section = Some(value),
                "macros" => macro_section = Some(value),
                other => {
                    return Err(pos.error(format!(
                        "unknown section `{other}` (expected expressions, slots or macros)"
                    )));
                }
            }
        }
        let Some(expressions) = expressions else {
            return Err(context.pos().error("`context` has no `expressions`"));
        };
        let mut slot_types = BTreeMap::new();
        if let Some(section) = slot_section {
            for (ty, pos, value) in map_of(section, "`slots`")? {
                let phrases = phrases_of(value, &format!("slot type `{ty}`"))?;
                let mut values: Vec<String> = Vec::new();
                for (p, ppos) in phrases {
                    let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                    if p.is_empty() {
                        return Err(ppos.error(format!("an empty phrase in slot type `{ty}`")));
                    }
                    if p.contains(['[', ']', '(', ')', '$', '@', ',']) {
                        return Err(ppos.error(format!(
                            "slot phrase `{p}` holds grammar syntax; slot phrases are plain words"
                        )));
                    }
                    if values.contains(&p) {
                        return Err(
                            ppos.error(format!("`{p}` is listed twice in slot type `{ty}`"))
                        );
                    }
                    values.push(p);
                }
                slot_types.insert(ty.clone(), (values, *pos));
            }
        }
        let mut slots = Vec::new();
        let mut macros = BTreeMap::new();
        if let Some(section) = macro_section {
            for (name, _, value) in map_of(section, "`macros`")? {
                let phrases = phrases_of(value, &format!("macro `@{name}`"))?;
                let alternatives =
                    parse_phrases(&phrases, &slot_types, &macros, &mut slots, false)?;
                macros.insert(name.clone(), Node::Choice(alternatives));
            }
        }
        let mut intents = Vec::new();
        let intent_entries = map_of(expressions, "`expressions`")?;
        if intent_entries.is_empty() {
            return Err(expressions.pos().error("`expressions` defines no intent"));
        }
        for (name, _, value) in intent_entries {
            let phrases = phrases_of(value, &format!("intent `{name}`"))?;
            let expressions = parse_phrases(&phrases, &slot_types, &macros, &mut slots, true)?;
            let mut used = Vec::new();
            expressions.iter().for_each(|e| e.collect_slots(&mut used));
            intents.push(Intent {
                name: name.clone(),
                slots: used,
                expressions,
            });
        }
        Ok(Grammar { intents, slots })
    }

    /// Whether `text` is a sentence of the grammar, and if so what it means:
    /// (intent, slots) of the first expression that matches. Case and
    /// punctuation other than apostrophes are ignored.
    pub fn parse_text(&self, text: &str) -> Option<(usize, Vec<(usize, usize)>)> {
        let words = normalize(text);
        for (ix, intent) in self.intents.iter().enumerate() {
            for e in &intent.expressions {
                let mut ends = Vec::new();
                self.match_node(e, &words, 0, Vec::new(), &mut ends);
                if let Some((_, slots)) = ends.into_iter().find(|(end, _)| *end == words.len()) {
                    return Some((ix, slots));
                }
            }
        }
        None
    }

    /// Every way `node` can match `words` from `at`: (end, slots filled).
    fn match_node(
        &self,
        node: &Node,
        words: &[String],
        at: usize,
        filled: Vec<(usize, usize)>,
        out: &mut Vec<(usize, Vec<(usize, usize)>)>,
    ) {
        if out.len() > 4096 {
            return;
        }
        match node {
            Node::Word(w) => {
                let w = normalize(w);
                if words.len() >= at + w.len() && words[at..at + w.len()] == w[..] {
                    out.push((at + w.len(), filled));
                }
            }
            Node::Slot(s) => {
                for (v, value) in self.slots[*s].values.iter().enumerate() {
                    let v_words = normalize(value);
                    if words.len() >= at + v_words.len()
                        && words[at..at + v_words.len()] == v_words[..]
                    {
                        let mut f = filled.clone();
                        f.push((*s, v));
                        out.push((at + v_words.len(), f));
                    }
                }
            }
            Node::Choice(alts) => {
                for a in alts {
                    self.match_node(a, words, at, filled.clone(), out);
                }
            }
            Node::Optional(alts) => {
                out.push((at, filled.clone()));
                for a in alts {
                    self.match_node(a, words, at, filled.clone(), out);
                }
            }
            Node::Seq(items) => {
                let mut states = vec![(at, filled)];
                for item in items {
                    let mut next = Vec::new();
                    for (pos, f) in states {
                        self.match_node(item, words, pos, f, &mut next);
                    }
                    next.dedup();
                    states = next;
                    if states.is_empty() {
                        return;
                    }
                }
                out.extend(states);
            }
        }
    }

    /// The pairs of neighbouring words of a sentence of this grammar, each
    /// slot's value standing as one word `$name` (its slot's name), with
    /// the sentence's start `<s>` and end `</s>` as words: "turn it up"
    /// with `up` a `direction` slot gives (`<s>`, turn), (turn, it),
    /// (it, `$direction`), (`$direction`, `</s>`). These marks cannot be
    /// words: [`normalize`] drops `$`, `<`, `>` and `/`.
    pub fn word_pairs(&self, u: &Utterance) -> Vec<(String, String)> {
        let words = normalize(&u.text);
        let mut marked = vec!["<s>".to_string()];
        let mut from = 0;
        // Slots are listed in the order the sentence says them: each is
        // looked for after the one before.
        for &(s, v) in &u.slots {
            let Some(slot) = self.slots.get(s) else {
                continue;
            };
            let value = slot.values.get(v).map(|t| normalize(t)).unwrap_or_default();
            if value.is_empty() || words.len() < value.len() {
                continue;
            }
            let at = (from..=words.len() - value.len())
                .find(|&j| words[j..j + value.len()] == value[..]);
            if let Some(j) = at {
                marked.extend(words[from..j].iter().cloned());
                marked.push(format!("${}", slot.name));
                from = j + value.len();
            }
        }
        marked.extend(words[from..].iter().cloned());
        marked.push("</s>".to_string());
        marked
            .windows(2)
            .map(|w| (w[0].clone(), w[1].clone()))
            .collect()
    }

    /// A sampler of sentences, balanced over intents and slot values.
    pub fn sampler(&self, seed: u64) -> Sampler<'_> {
        Sampler {
            grammar: self,
            rng: Rng::new(seed),
            next_intent: 0,
            used: self.slots.iter().map(|s| vec![0; s.values.len()]).collect(),
        }
    }

    /// Sentences to keep out of training for an honest test, per intent.
    ///
    /// Holding out must not take from training what it needs to learn: an
    /// intent gives at most a fifth of its distinct sentences (one, if it
    /// has 3 to 9; none below that) and at most `per_intent`; and a
    /// sentence is only taken while every part it says (as `rule` counts
    /// parts: see [`HoldOut`]) keeps at least half of the distinct
    /// sentences that say it (a test sentence is a new combination of
    /// parts training heard, never a part it did not). Distinct sentences
    /// are counted on a sample of `PROBE` per intent, so huge grammars are
    /// never enumerated.
    pub fn hold_out(&self, seed: u64, per_intent: usize, rule: HoldOut) -> Vec<Vec<Utterance>> {
        self.hold_out_beside(seed, per_intent, &[], rule)
    }

    /// More sentences to keep out of training, per intent, beside those
    /// `before` holds (as [`Grammar::hold_out`] gave them, by the same
    /// `rule`): up to `per_intent` more, none of `before`'s, under the same
    /// rules counted on both together (at most a fifth of an intent's
    /// distinct sentences in all; every part keeps half of the sentences
    /// that say it).
    pub fn hold_out_beside(
        &self,
        seed: u64,
        per_intent: usize,
        before: &[Vec<Utterance>],
        rule: HoldOut,
    ) -> Vec<Vec<Utterance>> {
        const PROBE: usize = 400;
        let n = self.intents.len();
        let mut probe = self.sampler(seed ^ 0xD15C);
        let mut seen: std::collections::HashSet<String> = Default::default();
        let mut distinct = vec![0usize; n];
        // What a sentence says: its words and its slot values, and by the
        // word-pair rule its pairs of neighbouring words too.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
        enum Part {
            Word(String),
            Value(usize, usize),
            Pair(String, String),
        }
        let parts = |u: &Utterance| -> Vec<Part> {
            let mut p: Vec<Part> = normalize(&u.text).into_iter().map(Part::Word).collect();
            p.extend(u.slots.iter().map(|&(s, v)| Part::Value(s, v)));
            if rule == HoldOut::WordPairs {
                p.extend(
                    self.word_pairs(u)
                        .into_iter()
                        .map(|(a, b)| Part::Pair(a, b)),
                );
            }
            p.sort();
            p.dedup();
            p
        };
        let mut says: BTreeMap<Part, usize> = BTreeMap::new();
        for _ in 0..PROBE * n {
            let u = probe.next_utterance();
            if seen.insert(u.text.clone()) {
                distinct[u.intent] += 1;
                for part in parts(&u) {
                    *says.entry(part).or_insert(0) += 1;
                }
            }
        }
        let caps: Vec<usize> = distinct
            .iter()
            .map(|&d| match d {
                0..=2 => 0,
                3..=9 => 1,
                _ => d / 5,
            })
            .enumerate()
            .map(|(i, c)| c.min(per_intent + before.get(i).map_or(0, Vec::len)))
            .collect();
        let mut left = says.clone();
        let mut held: Vec<Vec<Utterance>> = vec![Vec::new(); n];
        let mut taken: std::collections::HashSet<String> = Default::default();
        for (i, sentences) in before.iter().enumerate().take(n) {
            for u in sentences {
                if seen.contains(&u.text) {
                    for part in parts(u) {
                        if let Some(c) = left.get_mut(&part) {
                            *c = c.saturating_sub(1);
                        }
                    }
                }
                taken.insert(u.text.clone());
                held[i].push(u.clone());
            }
        }
        let mut sampler = self.sampler(seed ^ 0x7E57);
        let wanted: usize = caps.iter().sum();
        for _ in 0..wanted * 50 {
            if held.iter().map(Vec::len).sum::<usize>() >= wanted {
                break;
            }
            let u = sampler.next_utterance();
            if held[u.intent].len() >= caps[u.intent] || taken.contains(&u.text) {
                continue;
            }
            let counted = seen.contains(&u.text);
            let said = parts(&u);
            let keeps_half = said.iter().all(|part| {
                let all = says.get(part).copied().unwrap_or(0);
                let now = left.get(part).copied().unwrap_or(0);
                !counted || (now >= 2 && (now - 1) * 2 >= all)
            });
            if !keeps_half {
                continue;
            }
            if counted {
                for part in &said {
                    if let Some(c) = left.get_mut(part) {
                        *c -= 1;
                    }
                }
            }
            taken.insert(u.text.clone());
            held[u.intent].push(u);
        }
        for (i, sentences) in before.iter().enumerate().take(n) {
            let k = sentences.len().min(held[i].len());
            held[i].drain(..k);
        }
        held
    }
}

/// The name (slot type, slot or macro name) starting at `*i`; moves `*i` past it.
fn read_name(chars: &[char], i: &mut usize) -> String {
    let start = *i;
    while *i < chars.len() && is_name_char(chars[*i]) {
        *i += 1;
    }
    chars[start..*i].iter().collect()
}

/// Lower-case words, punctuation other than apostrophes dropped.
pub fn normalize(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || (c.is_ascii_punctuation() && c != '\'' && c != '-'))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Draws sentences: intents in turn, expressions and choices at random,
/// each slot's value the least used so far (ties at random), so that every
/// value of every slot is said about equally often.
pub struct Sampler<'g> {
    grammar: &'g Grammar,
    rng: Rng,
    next_intent: usize,
    /// Per slot, per value: times drawn.
    used: Vec<Vec<u32>>,
}

impl Sampler<'_> {
    /// The next sentence (intents in turn).
    pub fn next_utterance(&mut self) -> Utterance {
        let intent = self.next_intent;
        self.next_intent = (self.next_intent + 1) % self.grammar.intents.len();
        self.utterance_of(intent)
    }

    /// A sentence of the given intent.
    pub fn utterance_of(&mut self, intent: usize) -> Utterance {
        let grammar = self.grammar;
        let expressions = &grammar.intents[intent].expressions;
        let e = &expressions[self.rng.below(expressions.len())];
        let mut words = Vec::new();
        let mut slots = Vec::new();
        self.say(e, &mut words, &mut slots);
        Utterance {
            text: words.join(" "),
            intent,
            slots,
        }
    }

    fn say(&mut self, node: &Node, words: &mut Vec<String>, slots: &mut Vec<(usize, usize)>) {
        match node {
            Node::Word(w) => words.push(w.clone()),
            Node::Seq(v) => v.iter().for_each(|n| self.say(n, words, slots)),
            Node::Choice(v) => {
                let n = &v[self.rng.below(v.len())];
                self.say(n, words, slots)
            }
            Node::Optional(v) => {
                if self.rng.below(2) == 1 {
                    let n = &v[self.rng.below(v.len())];
                    self.say(n, words, slots)
                }
            }
            Node::Slot(s) => {
                let counts = &mut self.used[*s];
                let least = counts.iter().copied().min().unwrap_or(0);
                let candidates: Vec<usize> =
                    (0..counts.len()).filter(|&i| counts[i] == least).collect();
                let v = candidates[self.rng.below(candidates.len())];
                counts[v] += 1;
                words.push(self.grammar.slots[*s].values[v].clone());
                slots.push((*s, v));
            }
        }
    }

    /// The random source, for callers that draw alongside sentences.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }
}

/// A small deterministic generator (SplitMix64): reproducible data sets
/// from a seed, with no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-7);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}
