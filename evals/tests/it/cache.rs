//! Kept scores: a second run with the same contenders scores nothing new and decides the same.

use candle_core::quantized::GgmlDType;
use pai_evals::sources::corpus_items;
use pai_evals::suite::RETENTION_CORPUS;
use pai_evals::{
    evaluate, Contender, Contenders, Role, ScoreCache, Scoring, Suite, SuiteConfig, SuiteKind,
};
use pai_model::AdapterStack;

use crate::tiny;

#[test]
fn a_second_run_reuses_every_score() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), GgmlDType::Q8_0);
    let mut items = corpus_items(RETENTION_CORPUS, "general");
    items.truncate(6);
    let suite = Suite {
        config: SuiteConfig {
            name: "retention".into(),
            kind: SuiteKind::Retention,
            role: Role::Guard,
            description: String::new(),
            min_improvement: 0.0,
            max_regression: 0.02,
            path: None,
            max_items: 6,
            domain: None,
            fail_below: None,
        },
        items,
    };
    let cache = ScoreCache::new(&dir.path().join("cache"));
    let run = |cache: Option<&ScoreCache>| {
        let who = |label, key| Contender {
            label,
            adapters: AdapterStack::NONE,
            key: Some(key),
        };
        evaluate(
            &base.model,
            &base.tokenizer,
            std::slice::from_ref(&suite),
            Contenders {
                candidate: who("candidate", "k1"),
                incumbent: who("incumbent", "k2"),
                base: None,
            },
            Scoring {
                row_tokens: 128,
                pack: false,
                seed: 1,
                cache,
            },
            |_, _| {},
        )
        .unwrap()
    };
    let lines = |k: &str| {
        std::fs::read_to_string(dir.path().join("cache").join(format!("{k}.jsonl")))
            .map_or(0, |t| t.lines().count())
    };
    let first = run(Some(&cache));
    assert_eq!((lines("k1"), lines("k2")), (6, 6));
    let second = run(Some(&cache));
    assert_eq!((lines("k1"), lines("k2")), (6, 6), "nothing scored again");
    let uncached = run(None);
    for r in [&second, &uncached] {
        assert_eq!(r.suites[0].candidate, first.suites[0].candidate);
        assert_eq!(r.decision, first.decision);
    }
    // A damaged line is scored again, not trusted.
    let path = dir.path().join("cache/k1.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"score\"", "\"scor\"", 1)).unwrap();
    let third = run(Some(&cache));
    assert_eq!(lines("k1"), 7);
    assert_eq!(third.suites[0].candidate, first.suites[0].candidate);
}
