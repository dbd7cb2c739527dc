//! Emitting the rewritten handler: the original name and attributes, a new signature, and a
//! body that is one call into `idem_runtime::__private::run`.

use proc_macro2::{Group, Span, TokenStream, TokenTree};
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{GenericArgument, ItemFn, PathArguments, Type};

use crate::config::{Config, Mode, OnMissing, StrategyConfig};
use crate::handler::Handler;

/// Everything the expansion needs, already validated.
pub(crate) struct Expansion<'a> {
    pub(crate) item: &'a ItemFn,
    pub(crate) config: &'a Config,
    pub(crate) handler: Handler,
}

/// Moves every token of `tokens` to `span`, so that a compiler error about the call they make
/// points at the attribute argument or signature part that asked for it.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|token| match token {
            TokenTree::Group(group) => {
                let mut respanned = Group::new(group.delimiter(), respan(group.stream(), span));
                respanned.set_span(span);
                TokenTree::Group(respanned)
            }
            mut other => {
                other.set_span(span);
                other
            }
        })
        .collect()
}

/// The transaction's type with every lifetime elided. The transaction is a local borrow of the
/// store's, so a lifetime the user named on the parameter (`&'t mut PgTx<'c>`) cannot be one of
/// the function's lifetimes any more.
fn elide_lifetimes(ty: &Type) -> Type {
    struct Elide;
    impl syn::visit_mut::VisitMut for Elide {
        fn visit_lifetime_mut(&mut self, lifetime: &mut syn::Lifetime) {
            *lifetime = syn::Lifetime::new("'_", lifetime.span());
        }
    }
    let mut ty = ty.clone();
    syn::visit_mut::VisitMut::visit_type_mut(&mut Elide, &mut ty);
    ty
}

/// `Result<T, E>` written out: the two types, for a readable generated signature.
fn result_parts(ty: &Type) -> Option<(&Type, &Type)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(generics) = &last.arguments else {
        return None;
    };
    let mut types = generics.args.iter().filter_map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty),
        _ => None,
    });
    let (ok, err) = (types.next()?, types.next()?);
    types.next().is_none().then_some((ok, err))
}

pub(crate) fn expand(expansion: Expansion<'_>) -> TokenStream {
    let Expansion {
        item,
        config,
        handler,
    } = expansion;
    let krate = config
        .krate
        .as_ref()
        .map_or_else(|| quote!(::idem_runtime), |path| quote!(#path));
    let private = quote!(#krate::__private);

    // Our own locals and parameters are hygienic (mixed-site), so they never clash with the
    // user's names, and the user's names in the body never see ours.
    let mixed = Span::mixed_site();
    let store_param = format_ident!("store", span = mixed);
    let message_param = format_ident!("message", span = mixed);
    let ack_param = format_ident!("ack", span = mixed);
    let spec = format_ident!("SPEC", span = mixed);
    let prepared = format_ident!("prepared", span = mixed);
    let gate = format_ident!("gate", span = mixed);
    let span_var = format_ident!("span", span = mixed);
    let result = format_ident!("result", span = mixed);
    let tx_param = format_ident!("caller_tx", span = mixed);

    // Inner attributes (`#![allow(..)]` at the top of the body) stay inner, in the new body.
    let (inner_attrs, attrs): (Vec<&syn::Attribute>, Vec<&syn::Attribute>) = item
        .attrs
        .iter()
        .partition(|attr| matches!(attr.style, syn::AttrStyle::Inner(_)));
    let vis = &item.vis;
    let sig = &item.sig;
    let ident = &sig.ident;
    let ident_text = ident.to_string();
    let generics = &sig.generics;
    let where_clause = &generics.where_clause;
    // The body's statements, not its block: a block in tail position would trip
    // `unused_braces` in the user's code.
    let body = &item.block.stmts;
    let receiver = handler.receiver.as_ref().map(|r| quote!(#r,));
    let store_type = format_ident!("{}", config.store.type_name());
    let message_type = &handler.message.ty;
    let message_pat = &handler.message.pat;
    let output = &handler.output;
    let output_span = output.span();
    let handler_errors = respan(quote!(#private::HandlerErrors::of()), output_span);
    let into_result = respan(quote!(#private::into_result), output_span);

    let returns = match result_parts(output) {
        Some((ok, err)) => quote! {
            #private::core::result::Result<#private::Outcome<#ok>, #private::Error<#err>>
        },
        None => quote! {
            #private::core::result::Result<
                #private::Outcome<<#output as #private::HandlerResult>::Ok>,
                #private::Error<<#output as #private::HandlerResult>::Err>,
            >
        },
    };

    let scope = match &config.scope {
        Some(scope) => quote!(#scope),
        None => {
            let name = ident.to_string();
            quote!(#private::core::concat!(#private::core::module_path!(), "::", #name))
        }
    };
    let ttl = config
        .ttl_millis
        .map(|millis| quote!(.with_ttl_millis(#millis)));
    let max_attempts = config
        .max_attempts
        .map(|attempts| quote!(.with_max_attempts(#attempts)));
    let observe = match config.mode {
        Mode::Enforce => None,
        Mode::Observe => Some(quote!(.observing())),
    };

    let key_spec = &config.key;
    // Spanned on the key literal: a missing field, a private field or a type that cannot be a
    // key part is reported there.
    let key_part = respan(quote!(#private::key_part), key_spec.span);
    let message_at_key = format_ident!("message", span = mixed.located_at(key_spec.span));
    let message_id_var = format_ident!("message_id", span = mixed);
    let message_id_part = format_ident!("message_id_part", span = mixed);
    let key_parts = key_spec.fields.iter().map(|field| {
        let text = &field.text;
        if field.message_id {
            return quote! { (#text, #key_part(&#message_id_part)) };
        }
        let segments = &field.segments;
        let amp = syn::Token![&](key_spec.span);
        let dot = syn::Token![.](key_spec.span);
        quote! { (#text, #key_part(#amp #message_at_key #(#dot #segments)*)) }
    });
    let uses_message_id = key_spec.uses_message_id();
    let build_key = if uses_message_id {
        quote! {
            #private::key_with_message_id(
                #spec.scope(),
                #message_id_var.as_deref(),
                |#message_id_part| #private::key(#spec.scope(), &[#(#key_parts),*]),
            )
        }
    } else {
        quote!(#private::key(#spec.scope(), &[#(#key_parts),*]))
    };
    // Taken before the acknowledger moves into the pipeline; the companion that runs in the
    // caller's transaction takes the id as a parameter instead.
    let message_id_from_ack = uses_message_id.then(|| {
        quote! {
            let #message_id_var: #private::core::option::Option<::std::string::String> =
                #private::message_id(&#ack_param);
        }
    });
    let message_id_param = uses_message_id.then(|| quote!(#message_id_var: &str,));
    let message_id_from_param = uses_message_id.then(|| {
        quote! {
            let #message_id_var: #private::core::option::Option<::std::string::String> =
                #private::core::option::Option::Some(::std::string::String::from(#message_id_var));
        }
    });

    let mut strategy_items = TokenStream::new();
    let strategy_value = match &config.strategy {
        StrategyConfig::DedupTable => quote!(#private::DedupTable),
        StrategyConfig::UniqueConstraint { constraint } => {
            quote!(#private::UniqueConstraint::new(#constraint))
        }
        StrategyConfig::StateMachine {
            table,
            column,
            key_field,
            key_column,
            from,
            to,
            done,
            early,
            on_missing,
        } => {
            let missing = match on_missing {
                OnMissing::Retry => None,
                OnMissing::DeadLetter => Some(quote!(.on_missing(#private::OnMissing::DeadLetter))),
            };
            let transition = format_ident!("TRANSITION", span = mixed);
            let statements = format_ident!("STATEMENTS", span = mixed);
            strategy_items = quote! {
                const #transition: #private::Transition =
                    #private::Transition::new(#table, #column, #key_column, &[#(#from),*], #to)
                        .with_done(&[#(#done),*])
                        .with_early(&[#(#early),*])
                        #missing;
                // Built by the store on first use, then shared by every delivery.
                static #statements: #private::OnceLock<#private::TransitionSql> =
                    #private::OnceLock::new();
            };
            let state_key = respan(quote!(#private::state_key), key_spec.span);
            let amp = syn::Token![&](key_spec.span);
            let dot = syn::Token![.](key_spec.span);
            let segments = &key_field.segments;
            quote!(#private::StateMachine::new(
                &#transition,
                &#statements,
                #state_key(#amp #message_at_key #(#dot #segments)*),
            ))
        }
        StrategyConfig::Lock {
            lease_millis,
            fixed_lease,
        } => {
            let lock = match lease_millis {
                Some(millis) => quote!(#private::Lock::new(#millis)),
                None => quote!(<#private::Lock as #private::core::default::Default>::default()),
            };
            let fixed = fixed_lease.then(|| quote!(.fixed()));
            quote!(#lock #fixed)
        }
        StrategyConfig::Token { spend_on_error } => {
            let spend = spend_on_error.then(|| quote!(.spending_on_error()));
            quote!(#private::Token::new() #spend)
        }
    };

    let codec = match config.replay {
        Some(span) => respan(quote!(#private::JsonReplay::new()), span),
        None => quote!(#private::NoReplay),
    };
    let fingerprint_value = match config.fingerprint {
        Some(span) => {
            let fingerprint_fn = respan(quote!(#private::fingerprint), span);
            let message = format_ident!("message", span = mixed.located_at(span));
            let amp = syn::Token![&](span);
            quote!(#fingerprint_fn(#amp #message))
        }
        None => quote!(#private::no_fingerprint()),
    };
    // Evaluated at compile time: a default scope (module path and name) that is too long fails
    // the build, on the function's name.
    let check_scope = respan(quote!(#private::check_scope), ident.span());

    // With the default scope, two items next to the function that only a module can hold
    // together: in an `impl` block they become associated items, and in a function body local
    // ones, neither of which `self::` names, so a handler there fails to compile and must set
    // `scope` (the default, `module::name`, would be shared by every type's method of that
    // name, by every instantiation of a generic `impl`, and by every nested function of that
    // name in the module).
    let scope_probe = config.scope.is_none().then(|| {
        let probe = format_ident!(
            "handlers_in_impl_blocks_or_functions_need_an_explicit_scope_{}",
            ident,
            span = ident.span()
        );
        // Named, not `_`: an unnamed const is a parse error in an `impl`, with a message that
        // would hide the one above.
        let probe_const = format_ident!("__idem_scope_probe_{}", ident, span = ident.span());
        quote! {
            #[doc(hidden)]
            #[allow(dead_code, non_snake_case, clippy::all, clippy::pedantic)]
            fn #probe() {}
            #[doc(hidden)]
            #[allow(dead_code, non_upper_case_globals, clippy::all, clippy::pedantic)]
            const #probe_const: () = {
                let _ = self::#probe;
            };
        }
    });

    let spec_and_prepared = quote! {
        // A static, not a const: its address identifies this entry point's spec, and its
        // site (the attribute's `file:line:column`) the handler, so that two handlers sharing
        // a scope are caught at their first delivery, and one handler's entry points are not.
        static #spec: #private::HandlerSpec = #private::HandlerSpec::new(#scope)
            // The name and module too: handlers that one `macro_rules!` invocation emits
            // share its `file:line:column`.
            .at(#private::core::concat!(
                #private::core::module_path!(), "::", #ident_text, "@",
                #private::core::file!(), ":",
                #private::core::line!(), ":",
                #private::core::column!()
            ))
            #ttl #max_attempts #observe;
        // Every handler of the binary is listed, so that two sharing a scope both fail.
        #private::inventory::submit! { #private::Registration::of(&#spec) }
        #strategy_items
        // The gate, the key and the fingerprint run user code (`StateKeyPart`, `KeyPart`,
        // `Serialize`): a panic there is caught and settled like a failed delivery.
        let #prepared = #private::Prepared::new(
            || #strategy_value,
            || #build_key,
            || #fingerprint_value,
        );
    };
    // The body runs in the delivery's span; a panic in it is caught and rolled back (or, on
    // Redis, the lease released).
    let run_body = match &handler.tx {
        Some(tx) => {
            let tx_pat = &tx.pat;
            let tx_type = elide_lifetimes(&tx.ty);
            // Bound with the user's type, and located on it: a wrong transaction type is
            // reported as a mismatch on that type.
            let tx_arg = format_ident!("tx", span = mixed.located_at(tx.ty.span()));
            quote! {
                let (#tx_arg, #span_var) = #gate.parts();
                let #result = #private::body::<#output, _>(#span_var, async {
                    // These were parameters: `_tx` there is not a lint, here it would be.
                    #[allow(clippy::no_effect_underscore_binding)]
                    let #tx_pat: #tx_type = #tx_arg;
                    #[allow(clippy::no_effect_underscore_binding)]
                    let #message_pat = #message_param;
                    #(#body)*
                })
                .await;
                #gate.finish(#into_result(#result)).await
            }
        }
        None => {
            // The lease is renewed while the body runs.
            let renewal = format_ident!("renewal", span = mixed);
            quote! {
                let (#renewal, #span_var) = #gate.parts();
                let #result = #renewal
                    .hold(#private::body::<#output, _>(#span_var, async {
                        #[allow(clippy::no_effect_underscore_binding)]
                        let #message_pat = #message_param;
                        #(#body)*
                    }))
                    .await;
                #gate.finish(#into_result(#result)).await
            }
        }
    };

    // The companions: plain functions, so that they are valid next to a free function and in
    // an `impl` block alike (the attribute cannot tell which it is in). Each holds its own copy
    // of the body, since neither can name the other there (`f` vs `Self::f`).
    let companion_attrs: Vec<&syn::Attribute> = attrs
        .iter()
        .copied()
        .filter(|attr| {
            // Not `expect`: the companions allow what the handler is linted for, so an
            // expectation there would go unfulfilled.
            ["cfg", "cfg_attr", "allow", "warn", "deny", "forbid"]
                .iter()
                .any(|name| attr.path().is_ident(name))
        })
        .collect();
    let body_ident = format_ident!("{}_body", ident, span = ident.span());
    let in_transaction_ident = format_ident!("{}_in_transaction", ident, span = ident.span());
    let body_doc = format!(
        "The body of `{ident}` alone, undecorated: no gate, no record, no commit; it runs in the transaction you pass. For unit tests, and for callers that must not gate. Emitted by `#[idempotent]`."
    );
    let in_transaction_doc = format!(
        "`{ident}` inside a transaction you own: the gate and the body run in `tx` (in a savepoint); nothing begins, commits or acknowledges. `Ok(Processed)`: commit `tx` to make the body's writes and the dedup record durable together (roll it back and neither happened). `Ok(Duplicate)`: processed before; nothing written. `Err`: this call's writes were rolled back to the savepoint; roll `tx` back unless you handle the error. Emitted by `#[idempotent]`."
    );
    let in_transaction_doc = if uses_message_id {
        format!(
            "{in_transaction_doc} `message_id`: the broker's id of the message, which the key (`$message_id`) includes."
        )
    } else {
        in_transaction_doc
    };
    // A caller's transaction to gate in exists only on the SQL stores.
    let in_transaction_companion = handler.tx.is_some().then(|| {
        quote! {
            #(#companion_attrs)*
            #[doc = #in_transaction_doc]
            #[allow(dead_code, clippy::all, clippy::pedantic)]
            #vis async fn #in_transaction_ident #generics (
                #receiver
                #store_param: &#private::#store_type,
                #tx_param: &mut <#private::#store_type as #private::Store>::Tx,
                #message_param: #message_type,
                #message_id_param
            ) -> #returns #where_clause {
                #(#inner_attrs)*
                #message_id_from_param
                #spec_and_prepared
                let mut #gate = match #private::open_in(
                    #store_param,
                    #tx_param,
                    &#spec,
                    #prepared,
                    #codec,
                    #handler_errors,
                )
                .await
                {
                    #private::core::result::Result::Ok(gate) => gate,
                    #private::core::result::Result::Err(settled) => return settled,
                };
                #run_body
            }
        }
    });
    let open = if config.has_transaction() {
        format_ident!("open")
    } else {
        format_ident!("open_lease")
    };

    let inputs = &sig.inputs;
    let asyncness = &sig.asyncness;
    let original_output = &sig.output;
    let body_companion = quote! {
        #(#companion_attrs)*
        #[doc = #body_doc]
        // The same statements are linted where they also stand, in the handler itself.
        #[allow(dead_code, clippy::all, clippy::pedantic)]
        #vis #asyncness fn #body_ident #generics (#inputs) #original_output #where_clause {
            #(#inner_attrs)*
            #(#body)*
        }
    };

    if let (Some(element), Some(tx)) = (&handler.batch_element, &handler.tx) {
        let tx_pat = &tx.pat;
        let tx_type = elide_lifetimes(&tx.ty);
        let tx_arg = format_ident!("tx", span = mixed.located_at(tx.ty.span()));
        let deliveries = format_ident!("deliveries", span = mixed);
        let run = format_ident!("run", span = mixed);
        let part = format_ident!("part", span = mixed);
        let messages = format_ident!("messages", span = mixed);
        let message_id_arg = format_ident!("message_id", span = mixed);
        let batch_output = respan(
            quote!(#private::assert_batch_output::<#output>),
            output_span,
        );
        return quote! {
            #scope_probe
            #(#attrs)*
            #vis async fn #ident #generics (
                #receiver
                #store_param: &#private::#store_type,
                #deliveries: ::std::vec::Vec<(#element, impl #private::Acknowledger)>,
            ) -> ::std::vec::Vec<#returns> #where_clause {
                #(#inner_attrs)*
                const _: () = #check_scope(#scope);
                #batch_output();
                static #spec: #private::HandlerSpec = #private::HandlerSpec::new(#scope)
                    .at(#private::core::concat!(
                        #private::core::module_path!(), "::", #ident_text, "@",
                        #private::core::file!(), ":",
                        #private::core::line!(), ":",
                        #private::core::column!()
                    ))
                    #ttl #max_attempts;
                #private::inventory::submit! { #private::Registration::of(&#spec) }
                // Each part of the batch: gate, body on the fresh messages, commit and ack, or
                // roll back and split. The body is an async block, as for one message.
                let mut #run = #private::open_batch(
                    #store_param,
                    &#spec,
                    #handler_errors,
                    #deliveries,
                    || #strategy_value,
                    |#message_param: &#element, #message_id_arg: #private::core::option::Option<&str>| {
                        let #message_id_var = #message_id_arg;
                        #build_key
                    },
                    |#message_param: &#element| #fingerprint_value,
                )
                .await;
                while let #private::core::option::Option::Some(mut #part) = #run.next_part().await {
                    let (#tx_arg, #messages, #span_var) = #part.parts();
                    let #result = #private::body::<#output, _>(#span_var, async {
                        #[allow(clippy::no_effect_underscore_binding)]
                        let #tx_pat: #tx_type = #tx_arg;
                        #[allow(clippy::no_effect_underscore_binding)]
                        let #message_pat: &[#element] = #messages;
                        #(#body)*
                    })
                    .await;
                    #run.finish_part(#part, #into_result(#result)).await;
                }
                #run.into_results()
            }

            #body_companion
        };
    }

    quote! {
        #scope_probe
        #(#attrs)*
        #vis async fn #ident #generics (
            #receiver
            #store_param: &#private::#store_type,
            #message_param: #message_type,
            #ack_param: impl #private::Acknowledger,
        ) -> #returns #where_clause {
            #(#inner_attrs)*
            // Checked once, here: the companions share the scope.
            const _: () = #check_scope(#scope);
            #message_id_from_ack
            #spec_and_prepared
            // Three steps rather than one call taking the body as a closure: a closure over
            // `&mut Tx` needs a higher-ranked bound, and rustc cannot then prove the handler's
            // future `Send` (rust-lang/rust#110338). The body is an async block instead, so
            // `return` and `?` in it behave as in the original function.
            let mut #gate = match #private::#open(
                #store_param,
                &#spec,
                #prepared,
                #codec,
                #handler_errors,
                #ack_param,
            )
            .await
            {
                #private::core::result::Result::Ok(gate) => gate,
                #private::core::result::Result::Err(settled) => return settled,
            };
            #run_body
        }

        #in_transaction_companion

        #body_companion
    }
}
